//! The F3 performance overlay (iyes_perf_ui): FPS and frame time from Bevy's diagnostics plus
//! entries of ours for the voice plane — jitter buffer delay, packets per second, loss.

use bevy::diagnostic::FrameTimeDiagnosticsPlugin;
use bevy::ecs::system::lifetimeless::SRes;
use bevy::ecs::system::SystemParam;
use bevy::prelude::*;
use iyes_perf_ui::entry::PerfUiEntry;
use iyes_perf_ui::prelude::*;
use iyes_perf_ui::PerfUiSet;

use crate::voice::Voice;

/// Whether the overlay is shown; toggled with F3.
#[derive(Resource, Default)]
pub struct PerfOverlay {
    pub visible: bool,
    /// The overlay's root node and the camera it is drawn with.
    root: Option<(Entity, Entity)>,
}

/// Adds the overlay and our entries.
pub struct PerfPlugin;

impl Plugin for PerfPlugin {
    fn build(&self, app: &mut App) {
        if !app.is_plugin_added::<FrameTimeDiagnosticsPlugin>() {
            app.add_plugins(FrameTimeDiagnosticsPlugin::default());
        }
        app.add_plugins(PerfUiPlugin)
            .add_perf_ui_simple_entry::<PerfUiJitterDelay>()
            .add_perf_ui_simple_entry::<PerfUiPacketRate>()
            .add_perf_ui_simple_entry::<PerfUiLoss>()
            .init_resource::<PerfOverlay>()
            .add_systems(Update, show_or_hide.before(PerfUiSet::Setup));
    }
}

fn show_or_hide(mut overlay: ResMut<PerfOverlay>, mut commands: Commands) {
    match (overlay.visible, overlay.root) {
        (true, None) => {
            // egui paints over the whole window after the main camera's bevy_ui pass, so the
            // overlay gets its own camera, ordered after it and not clearing what is there.
            let camera = commands
                .spawn((
                    Camera2d,
                    Camera {
                        order: 1,
                        clear_color: ClearColorConfig::None,
                        ..default()
                    },
                    // Sees no sprites (they are on layer 0): the mesh view is drawn once,
                    // under egui, not again over it. bevy_ui ignores render layers.
                    bevy::render::view::RenderLayers::layer(1),
                ))
                .id();
            // The root is a UI node from its first frame: iyes_perf_ui adds the `Node` itself
            // one frame late, after the rows are already parented to it, and bevy_ui then
            // lays the rows out as a detached hierarchy of size zero (an empty 4 px box).
            let root = PerfUiRoot {
                // Bottom right is the empty end of the controls panel, above the status bar,
                // so the figures cover nothing a person needs during a call.
                position: PerfUiPosition::BottomRight,
                margin: 36.0,
                background_color: Color::srgba(0.0, 0.0, 0.0, 0.85),
                ..default()
            };
            let e = commands
                .spawn((
                    Node {
                        position_type: PositionType::Absolute,
                        bottom: Val::Px(root.margin),
                        right: Val::Px(root.margin),
                        flex_direction: FlexDirection::Column,
                        padding: UiRect::all(Val::Px(root.padding)),
                        ..default()
                    },
                    BackgroundColor(root.background_color),
                    root,
                    UiTargetCamera(camera),
                    PerfUiEntryFPS::default(),
                    PerfUiEntryFrameTime::default(),
                    PerfUiJitterDelay,
                    PerfUiPacketRate::default(),
                    PerfUiLoss,
                ))
                .id();
            overlay.root = Some((e, camera));
        }
        (false, Some((e, camera))) => {
            commands.entity(e).despawn();
            commands.entity(camera).despawn();
            overlay.root = None;
        }
        _ => {}
    }
}

/// The largest value of `figure` among the peers (0 with none).
fn worst_peer(voice: &Voice, figure: impl Fn(&crate::voice::PeerSnapshot) -> f32) -> f32 {
    voice.last.peers.iter().map(figure).fold(0.0, f32::max)
}

/// Largest jitter buffer delay among peers, ms.
#[derive(Component, Default)]
pub struct PerfUiJitterDelay;

impl PerfUiEntry for PerfUiJitterDelay {
    type Value = f32;
    type SystemParam = SRes<Voice>;

    fn label(&self) -> &str {
        "Jitter buffer (max)"
    }
    fn sort_key(&self) -> i32 {
        100
    }
    fn update_value(
        &self,
        voice: &mut <Self::SystemParam as SystemParam>::Item<'_, '_>,
    ) -> Option<f32> {
        Some(worst_peer(voice, |p| p.buffer_ms))
    }
    fn format_value(&self, v: &f32) -> String {
        format!("{v:.0} ms")
    }
}

/// Voice packets received per second, all peers together.
#[derive(Component, Default)]
pub struct PerfUiPacketRate {
    last: std::sync::Mutex<Option<(std::time::Instant, u64, f32)>>,
}

impl PerfUiEntry for PerfUiPacketRate {
    type Value = f32;
    type SystemParam = SRes<Voice>;

    fn label(&self) -> &str {
        "Packets in /s"
    }
    fn sort_key(&self) -> i32 {
        101
    }
    fn update_value(
        &self,
        voice: &mut <Self::SystemParam as SystemParam>::Item<'_, '_>,
    ) -> Option<f32> {
        let total: u64 = voice.last.peers.iter().map(|p| p.packets_in).sum();
        let now = std::time::Instant::now();
        // Runs on the main thread once per frame; the lock is never contended.
        let mut last = self.last.lock().ok()?;
        let rate = match *last {
            Some((t, _, r)) if now.duration_since(t).as_secs_f32() < 1.0 => {
                return Some(r);
            }
            Some((t, n0, _)) => {
                total.saturating_sub(n0) as f32 / now.duration_since(t).as_secs_f32()
            }
            None => 0.0,
        };
        *last = Some((now, total, rate));
        Some(rate)
    }
    fn format_value(&self, v: &f32) -> String {
        format!("{v:.0}")
    }
}

/// Worst loss among peers, percent.
#[derive(Component, Default)]
pub struct PerfUiLoss;

impl PerfUiEntry for PerfUiLoss {
    type Value = f32;
    type SystemParam = SRes<Voice>;

    fn label(&self) -> &str {
        "Loss (worst peer)"
    }
    fn sort_key(&self) -> i32 {
        102
    }
    fn update_value(
        &self,
        voice: &mut <Self::SystemParam as SystemParam>::Item<'_, '_>,
    ) -> Option<f32> {
        Some(worst_peer(voice, |p| p.loss_pct))
    }
    fn format_value(&self, v: &f32) -> String {
        format!("{v:.1} %")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        let mut app = App::new();
        app.add_plugins(MinimalPlugins)
            .init_resource::<Voice>()
            .add_plugins(PerfPlugin);
        app
    }

    /// The regression behind "F3 shows an empty 4 px box": rows were parented to a root that
    /// was not yet a UI node, and bevy_ui laid them out as a detached tree of size zero.
    #[test]
    fn rows_are_only_ever_children_of_a_ui_node() {
        let mut app = app();
        app.world_mut().resource_mut::<PerfOverlay>().visible = true;
        for _ in 0..4 {
            app.update();
            let world = app.world_mut();
            let mut roots =
                world.query_filtered::<(Option<&Node>, Option<&Children>), With<PerfUiRoot>>();
            for (node, children) in roots.iter(world) {
                if children.is_some() {
                    assert!(node.is_some(), "rows attached to a root without a Node");
                }
            }
        }
        let world = app.world_mut();
        let mut roots = world.query_filtered::<&Children, With<PerfUiRoot>>();
        let rows = roots.single(world).expect("one overlay root").len();
        assert_eq!(rows, 5, "FPS, frame time, jitter buffer, packets/s, loss");
        let mut texts = world.query::<&Text>();
        let labels: Vec<String> = texts.iter(world).map(|t| t.0.clone()).collect();
        for label in [
            "FPS: ",
            "Jitter buffer (max): ",
            "Packets in /s: ",
            "Loss (worst peer): ",
        ] {
            assert!(
                labels.iter().any(|l| l == label),
                "missing {label:?} in {labels:?}"
            );
        }
    }

    #[test]
    fn hiding_despawns_the_overlay_and_its_camera() {
        let mut app = app();
        app.world_mut().resource_mut::<PerfOverlay>().visible = true;
        app.update();
        app.update();
        app.world_mut().resource_mut::<PerfOverlay>().visible = false;
        app.update();
        let world = app.world_mut();
        assert_eq!(world.query::<&PerfUiRoot>().iter(world).count(), 0);
        assert_eq!(world.query::<&Camera>().iter(world).count(), 0);
        assert_eq!(world.query::<&Text>().iter(world).count(), 0);
    }
}
