//! The live mesh view, drawn by Bevy (sprites and 2D text, under egui's panels): the channel's
//! members as nodes that pulse with each speaker's level, our link to each as a line coloured
//! by its state (direct, relayed, punching, unreachable) with its round trip and loss.
//!
//! [`layout`] is the pure picture (placement, colours, labels); [`systems`] keeps one set of
//! entities per member and writes only what changed. The UI leaves a transparent region of
//! its central panel for it and says where in [`MeshViewArea`].

pub mod layout;
pub mod systems;

use bevy::prelude::*;

pub use systems::{MeshEntities, MeshPart, MeshRoot, MeshViewArea};

/// The mesh view's systems, in `Update`.
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub struct MeshViewSet;

/// Adds the mesh view (the UI plugin adds it; benches and tests add it alone).
pub struct MeshViewPlugin;

impl Plugin for MeshViewPlugin {
    fn build(&self, app: &mut App) {
        app.init_resource::<MeshViewArea>()
            .init_resource::<MeshEntities>()
            .add_systems(Startup, systems::setup_mesh_view)
            .add_systems(
                Update,
                (systems::sync_mesh, systems::match_backdrop).in_set(MeshViewSet),
            );
    }
}
