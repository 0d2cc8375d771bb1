//! A small line chart of the last minute of one figure (a peer's loss or jitter), for the
//! member's details: enough to see whether a bad moment is a blip or a trend.

use egui::{Color32, Pos2, Rect, Sense, Shape, Stroke, Ui, Vec2, WidgetInfo, WidgetType};

/// The chart's top value: the largest sample, but at least `floor` so a quiet link (0.1 %
/// loss) is drawn as the flat line it is rather than blown up to full height.
pub fn scale_max(values: impl Iterator<Item = f32>, floor: f32) -> f32 {
    values.filter(|v| v.is_finite()).fold(floor, f32::max)
}

/// The polylines of a chart of `values` (oldest first) in `rect`, with `capacity` samples
/// across the full width so a young history grows from the right. A NaN sample (no voice
/// then) breaks the line; each run of finite samples is one polyline.
pub fn sparkline_points(values: &[f32], capacity: usize, top: f32, rect: Rect) -> Vec<Vec<Pos2>> {
    let step = rect.width() / (capacity.max(2) - 1) as f32;
    let first = capacity.saturating_sub(values.len());
    let top = if top > 0.0 { top } else { 1.0 };
    let mut runs: Vec<Vec<Pos2>> = Vec::new();
    let mut run: Vec<Pos2> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if !v.is_finite() {
            if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
            continue;
        }
        let x = rect.left() + (first + i) as f32 * step;
        let y = rect.bottom() - (v.clamp(0.0, top) / top) * rect.height();
        run.push(Pos2::new(x, y));
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// Draws the chart of `values` (oldest first, NaN for gaps) in a `size` box. `description`
/// is what a screen reader (and a test) reads, e.g. "loss, last minute, up to 4.0 %".
pub fn sparkline(
    ui: &mut Ui,
    values: &[f32],
    capacity: usize,
    top: f32,
    size: Vec2,
    color: Color32,
    description: &str,
) -> egui::Response {
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    response.widget_info(|| WidgetInfo::labeled(WidgetType::Image, true, description));
    if ui.is_rect_visible(rect) {
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
        let plot = rect.shrink(2.0);
        for run in sparkline_points(values, capacity, top, plot) {
            if run.len() == 1 {
                painter.circle_filled(run[0], 1.5, color);
            } else {
                painter.add(Shape::line(run, Stroke::new(1.5, color)));
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_breaks_the_line_and_values_scale_to_the_top() {
        let rect = Rect::from_min_size(Pos2::ZERO, Vec2::new(30.0, 10.0));
        let runs = sparkline_points(&[0.0, 5.0, f32::NAN, 10.0], 4, 10.0, rect);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], vec![Pos2::new(0.0, 10.0), Pos2::new(10.0, 5.0)]);
        assert_eq!(runs[1], vec![Pos2::new(30.0, 0.0)]);
    }

    #[test]
    fn a_young_history_grows_from_the_right() {
        let rect = Rect::from_min_size(Pos2::ZERO, Vec2::new(59.0, 10.0));
        let runs = sparkline_points(&[1.0, 1.0], 60, 2.0, rect);
        assert_eq!(runs[0][1].x, 59.0, "the newest sample is at the right edge");
        assert_eq!(runs[0][0].x, 58.0);
    }

    #[test]
    fn the_scale_has_a_floor() {
        assert_eq!(scale_max([0.1, f32::NAN, 0.2].into_iter(), 5.0), 5.0);
        assert_eq!(scale_max([0.1, 12.0].into_iter(), 5.0), 12.0);
    }
}
