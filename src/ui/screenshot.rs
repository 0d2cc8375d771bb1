//! Saves a PNG of the window after a delay and exits (`P2P_VOICE_SCREENSHOT=path`), so
//! `make screenshots` can render the real app under Xvfb.

use std::path::PathBuf;
use std::time::Duration;

use bevy::prelude::*;
use bevy::render::view::screenshot::{save_to_disk, Screenshot};

/// Where and when to take the picture.
#[derive(Resource, Clone)]
pub struct ScreenshotPlan {
    pub path: PathBuf,
    pub after: Duration,
    taken: Option<Duration>,
}

impl ScreenshotPlan {
    /// From `P2P_VOICE_SCREENSHOT` (path) and `P2P_VOICE_SCREENSHOT_AFTER` (seconds, default 4).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("P2P_VOICE_SCREENSHOT")?;
        let after = std::env::var("P2P_VOICE_SCREENSHOT_AFTER")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(4.0);
        Some(Self {
            path: PathBuf::from(path),
            after: Duration::from_secs_f64(after),
            taken: None,
        })
    }
}

/// Takes the screenshot and exits shortly after.
pub struct ScreenshotPlugin(pub ScreenshotPlan);

impl Plugin for ScreenshotPlugin {
    fn build(&self, app: &mut App) {
        app.insert_resource(self.0.clone())
            .add_systems(Update, take_screenshot);
    }
}

fn take_screenshot(
    time: Res<Time<Real>>,
    mut plan: ResMut<ScreenshotPlan>,
    mut commands: Commands,
    mut exit: EventWriter<AppExit>,
) {
    let now = time.elapsed();
    match plan.taken {
        None if now >= plan.after => {
            commands
                .spawn(Screenshot::primary_window())
                .observe(save_to_disk(plan.path.clone()));
            plan.taken = Some(now);
        }
        Some(t) if now.saturating_sub(t) > Duration::from_secs(2) => {
            exit.write(AppExit::Success);
        }
        _ => {}
    }
}
