//! egui's share of the mesh view: the switch above the overview, the room left for Bevy to
//! draw the mesh in (see `ui::mesh`), and the legend of the line colours under it.

use egui::{Rect, Sense, Ui, Vec2};

use super::overview;
use super::peer_details::kind_color;
use crate::ui::actions::UiAction;
use crate::ui::mesh::layout::LinkKind;
use crate::ui::view::OverviewView;

/// Share of the central panel's height the overview keeps while the mesh is shown.
const OVERVIEW_SHARE: f32 = 0.4;
/// The overview keeps at least this much (a channel header and a few members).
const OVERVIEW_MIN_HEIGHT: f32 = 120.0;

/// The "Mesh view" switch.
pub fn mesh_toggle(ui: &mut Ui, shown: bool) -> Vec<UiAction> {
    let mut on = shown;
    let response = ui
        .toggle_value(&mut on, "Mesh view")
        .on_hover_text("Show your channel's voice links as a graph under the list");
    if response.changed() {
        vec![UiAction::ToggleMeshView]
    } else {
        Vec::new()
    }
}

/// The overview in the top part, then an empty region for the mesh, then the legend.
/// Returns the region (in egui's screen coordinates) and the overview's actions.
pub fn overview_and_mesh(ui: &mut Ui, view: &OverviewView) -> (Rect, Vec<UiAction>) {
    let height = (ui.available_height() * OVERVIEW_SHARE).max(OVERVIEW_MIN_HEIGHT);
    let width = ui.available_width();
    let actions = ui
        .allocate_ui(Vec2::new(width, height), |ui| {
            ui.set_min_size(Vec2::new(width, height));
            overview(ui, view)
        })
        .inner;
    ui.separator();
    let legend_height = ui.spacing().interact_size.y + ui.spacing().item_spacing.y;
    let free = ui.available_rect_before_wrap();
    let area = Rect::from_min_max(
        free.min,
        egui::pos2(free.max.x, (free.max.y - legend_height).max(free.min.y)),
    );
    ui.allocate_rect(area, Sense::hover());
    mesh_legend(ui);
    (area, actions)
}

/// One coloured bar and word per kind of link.
pub fn mesh_legend(ui: &mut Ui) {
    ui.horizontal(|ui| {
        for kind in LinkKind::ALL {
            // Painted: the default fonts have no box-drawing glyphs.
            let (rect, _) = ui.allocate_exact_size(Vec2::new(18.0, 10.0), Sense::hover());
            ui.painter().rect_filled(
                Rect::from_center_size(rect.center(), Vec2::new(18.0, 3.0)),
                0.0,
                kind_color(kind),
            );
            ui.label(kind.word());
            ui.add_space(6.0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::{kittest::Queryable, Harness};

    #[test]
    fn the_switch_asks_to_toggle_the_mesh_view() {
        let mut h = Harness::new_ui_state(
            |ui, s: &mut Vec<UiAction>| {
                let a = mesh_toggle(ui, false);
                s.extend(a);
            },
            Vec::new(),
        );
        h.get_by_label("Mesh view").click();
        h.run();
        assert_eq!(*h.state(), vec![UiAction::ToggleMeshView]);
    }

    #[test]
    fn the_legend_names_every_colour_and_the_mesh_gets_room() {
        let view = OverviewView::default();
        let mut area = None;
        let h = Harness::builder()
            .with_size(Vec2::new(600.0, 500.0))
            .build_ui(|ui| {
                area = Some(overview_and_mesh(ui, &view).0);
            });
        for word in ["direct", "relayed", "punching", "unreachable"] {
            h.get_by_label(word);
        }
        drop(h);
        let area = area.unwrap();
        assert!(area.height() > 200.0, "{area:?}");
        assert!(area.width() > 500.0, "{area:?}");
    }
}
