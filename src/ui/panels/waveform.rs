//! A scrolling waveform / level history of the channel mix, drawn with painter lines.

use egui::{Pos2, Rect, Response, Sense, Shape, Stroke, Ui, Vec2, WidgetInfo, WidgetType};

use super::meters::SPEAKING_COLOR;
use crate::ui::view::MixHistory;

/// Maps the history onto points inside `rect`: the newest value at the right edge, one slot per
/// `capacity` across the width (so the trace scrolls left as values arrive), value 0 on the
/// vertical centre and ±1 at the top/bottom edge (values are clamped).
pub fn waveform_points(rect: Rect, history: &MixHistory) -> Vec<Pos2> {
    let slots = (history.capacity() - 1) as f32;
    let dx = rect.width() / slots;
    let half = rect.height() / 2.0;
    let center = rect.center().y;
    let first_slot = history.capacity() - history.len();
    history
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = rect.left() + (first_slot + i) as f32 * dx;
            Pos2::new(x, center - v.clamp(-1.0, 1.0) * half)
        })
        .collect()
}

/// Draws the history in a box of `size`.
pub fn waveform(ui: &mut Ui, history: &MixHistory, size: Vec2) -> Response {
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    if ui.is_rect_visible(rect) {
        let painter = ui.painter_at(rect);
        let visuals = ui.visuals();
        painter.rect_filled(rect, 2.0, visuals.extreme_bg_color);
        painter.hline(
            rect.x_range(),
            rect.center().y,
            Stroke::new(1.0, visuals.faint_bg_color),
        );
        if history.len() >= 2 {
            painter.add(Shape::line(
                waveform_points(rect, history),
                Stroke::new(1.5, SPEAKING_COLOR),
            ));
        }
    }
    response.widget_info(|| WidgetInfo::labeled(WidgetType::Other, true, "Channel mix waveform"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::{kittest::Queryable, Harness};

    fn rect() -> Rect {
        Rect::from_min_size(Pos2::new(0.0, 0.0), Vec2::new(100.0, 20.0))
    }

    #[test]
    fn newest_value_is_at_the_right_edge() {
        let mut h = MixHistory::new(11);
        h.extend([0.0, 1.0, -1.0]);
        let points = waveform_points(rect(), &h);
        assert_eq!(points.len(), 3);
        assert_eq!(points[2], Pos2::new(100.0, 20.0));
        assert_eq!(points[1], Pos2::new(90.0, 0.0));
        assert_eq!(points[0], Pos2::new(80.0, 10.0));
    }

    #[test]
    fn full_history_spans_the_width_and_clamps_values() {
        let mut h = MixHistory::new(3);
        h.extend([5.0, 0.5, -5.0]);
        let points = waveform_points(rect(), &h);
        assert_eq!(
            points,
            vec![
                Pos2::new(0.0, 0.0),
                Pos2::new(50.0, 5.0),
                Pos2::new(100.0, 20.0)
            ]
        );
    }

    #[test]
    fn waveform_widget_draws_a_line_for_the_history() {
        let mut history = MixHistory::new(50);
        history.extend((0..50).map(|i| (i as f32 * 0.3).sin()));
        let h = Harness::new_ui(|ui| {
            waveform(ui, &history, Vec2::new(200.0, 40.0));
        });
        h.get_by_label("Channel mix waveform");
        let has_line = h
            .output()
            .shapes
            .iter()
            .any(|s| matches!(&s.shape, Shape::Path(p) if p.points.len() == 50));
        assert!(has_line);
    }
}
