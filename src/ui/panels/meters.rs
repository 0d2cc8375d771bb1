//! Small painted level meters shared by the overview (per member) and the controls (own input).

use egui::{Color32, Rect, Response, Sense, Stroke, Ui, Vec2, WidgetInfo, WidgetType};

/// Lowest level a dB meter shows; anything quieter draws as empty.
pub const METER_FLOOR_DB: f32 = -60.0;

/// Colour of the bar and ring while someone is speaking.
pub const SPEAKING_COLOR: Color32 = Color32::from_rgb(60, 200, 90);

/// Maps a dBFS value onto `0.0..=1.0` of a meter spanning [`METER_FLOOR_DB`]..0 dB.
/// Non-finite or quieter-than-floor values map to 0.
pub fn db_to_fraction(db: f32) -> f32 {
    if !db.is_finite() || db <= METER_FLOOR_DB {
        return 0.0;
    }
    ((db - METER_FLOOR_DB) / -METER_FLOOR_DB).clamp(0.0, 1.0)
}

/// The x coordinate inside `rect` where a dB value sits on the meter scale.
pub fn db_to_x(rect: Rect, db: f32) -> f32 {
    rect.left() + rect.width() * db_to_fraction(db)
}

/// Draws a horizontal bar filled to `fraction` (clamped to 0..1); green while `active`.
pub fn level_meter(ui: &mut Ui, fraction: f32, size: Vec2, active: bool) -> Response {
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    if ui.is_rect_visible(rect) {
        paint_bar(ui, rect, fraction, active);
    }
    let percent = (fraction.clamp(0.0, 1.0) * 100.0).round();
    response.widget_info(|| {
        WidgetInfo::labeled(
            WidgetType::ProgressIndicator,
            true,
            format!("Level {percent}%"),
        )
    });
    response
}

/// Draws a dBFS meter with the voice-activity threshold as a vertical line across it.
pub fn db_meter_with_threshold(
    ui: &mut Ui,
    level_db: f32,
    threshold_db: f32,
    speaking: bool,
    size: Vec2,
) -> Response {
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    if ui.is_rect_visible(rect) {
        paint_bar(ui, rect, db_to_fraction(level_db), speaking);
        let x = db_to_x(rect, threshold_db);
        ui.painter().vline(
            x,
            rect.y_range(),
            Stroke::new(2.0, ui.visuals().warn_fg_color),
        );
    }
    response.widget_info(|| {
        WidgetInfo::labeled(
            WidgetType::ProgressIndicator,
            true,
            format!("Input level {level_db:.0} dB, threshold {threshold_db:.0} dB"),
        )
    });
    response
}

fn paint_bar(ui: &Ui, rect: Rect, fraction: f32, active: bool) {
    let painter = ui.painter();
    let visuals = ui.visuals();
    painter.rect_filled(rect, 2.0, visuals.extreme_bg_color);
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if fraction > 0.0 {
        let mut filled = rect;
        filled.set_width(rect.width() * fraction);
        let color = if active {
            SPEAKING_COLOR
        } else {
            visuals.weak_text_color()
        };
        painter.rect_filled(filled, 2.0, color);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::Pos2;

    #[test]
    fn db_scale_maps_floor_to_zero_and_full_scale_to_one() {
        assert_eq!(db_to_fraction(METER_FLOOR_DB), 0.0);
        assert_eq!(db_to_fraction(-120.0), 0.0);
        assert_eq!(db_to_fraction(f32::NEG_INFINITY), 0.0);
        assert_eq!(db_to_fraction(0.0), 1.0);
        assert_eq!(db_to_fraction(6.0), 1.0);
        assert!((db_to_fraction(-30.0) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn threshold_line_sits_proportionally_inside_the_meter() {
        let rect = Rect::from_min_size(Pos2::new(10.0, 0.0), Vec2::new(120.0, 8.0));
        assert!((db_to_x(rect, -30.0) - 70.0).abs() < 1e-4);
        assert!((db_to_x(rect, -45.0) - 40.0).abs() < 1e-4);
    }
}
