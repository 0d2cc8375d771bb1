//! The chat panel: the channel's messages of this session (sender, time, text; long ones wrap,
//! http(s) links are clickable), scrolling and sticking to the newest, and an input line that
//! sends with Enter.
//!
//! Messages are end-to-end encrypted per member by the voice plane (`voice::net::chat`); the
//! panel only shows what arrived and hands what was typed on as [`UiAction::SendChat`].

use std::collections::VecDeque;

use egui::{Align, Color32, Key, Layout, RichText, ScrollArea, TextEdit, Ui};

use crate::ui::actions::UiAction;
use crate::voice::net::chat::{check_text, ChatError, MAX_CHAT_CHARS};
use crate::voice::ChatLine;

/// From how many characters on the input line shows its count against the limit.
const COUNT_FROM: usize = MAX_CHAT_CHARS - 200;

/// What the chat panel shows.
#[derive(Debug, Clone, Copy)]
pub struct ChatView<'a> {
    /// The session's messages, oldest first.
    pub lines: &'a VecDeque<ChatLine>,
    /// Why the last message was not sent, if it was not.
    pub notice: Option<&'a str>,
    /// Whether we are in a channel (else there is nobody to send to).
    pub in_channel: bool,
    /// Local time's offset from UTC in minutes, for the time of day shown with each message.
    pub utc_offset_minutes: i32,
}

/// `HH:MM` of Unix time `ms` at `offset_minutes` from UTC.
pub fn clock_time(ms: u64, offset_minutes: i32) -> String {
    let minutes = (ms / 60_000) as i64 + i64::from(offset_minutes);
    let of_day = minutes.rem_euclid(24 * 60);
    format!("{:02}:{:02}", of_day / 60, of_day % 60)
}

/// One piece of a message: plain text, or a link to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment<'a> {
    Text(&'a str),
    Link(&'a str),
}

/// Cuts `text` into plain runs and http(s) links (a link runs to the next whitespace, less
/// trailing punctuation that usually ends a sentence).
pub fn segments(text: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    let mut plain_from = 0;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let at_word_start = i == 0 || text[..i].ends_with(char::is_whitespace);
        if at_word_start && (rest.starts_with("https://") || rest.starts_with("http://")) {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let link = rest[..end].trim_end_matches(['.', ',', ';', ':', '!', '?', ')', '"', '\'']);
            let scheme_only = link.ends_with("//");
            if !scheme_only {
                if plain_from < i {
                    out.push(Segment::Text(&text[plain_from..i]));
                }
                out.push(Segment::Link(link));
                i += link.len();
                plain_from = i;
                continue;
            }
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    if plain_from < text.len() {
        out.push(Segment::Text(&text[plain_from..]));
    }
    out
}

/// Draws the panel; edits `draft` (the input line) in place and returns
/// [`UiAction::SendChat`] when the user presses Enter or clicks Send with a valid message.
pub fn chat(ui: &mut Ui, view: &ChatView<'_>, draft: &mut String) -> Vec<UiAction> {
    let mut actions = Vec::new();
    ui.heading("Chat");
    ui.label(
        RichText::new("End-to-end encrypted; kept for this session only")
            .small()
            .weak(),
    );
    ui.separator();
    // The input stays at the bottom; the history takes the rest and scrolls.
    ui.with_layout(Layout::bottom_up(Align::LEFT), |ui| {
        let problem = match check_text(draft) {
            Err(e @ ChatError::TooLong { .. }) => Some(e.to_string()),
            _ => None,
        };
        if let Some(notice) = view.notice {
            ui.colored_label(ui.visuals().error_fg_color, notice);
        }
        if let Some(p) = &problem {
            ui.colored_label(ui.visuals().error_fg_color, p);
        } else {
            let chars = draft.chars().count();
            if chars >= COUNT_FROM {
                ui.label(RichText::new(format!("{chars} / {MAX_CHAT_CHARS}")).small());
            }
        }
        let mut submit = false;
        ui.horizontal(|ui| {
            let can_send = view.in_channel && problem.is_none() && check_text(draft).is_ok();
            let send = ui.add_enabled(can_send, egui::Button::new("Send"));
            let label = ui.label("Message");
            let hint = if view.in_channel {
                "Enter sends to the channel"
            } else {
                "Join a channel to chat"
            };
            let edit = ui.add_enabled(
                view.in_channel,
                TextEdit::singleline(draft)
                    .hint_text(hint)
                    .desired_width(ui.available_width()),
            );
            let edit = edit.labelled_by(label.id);
            let entered = edit.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
            if (entered || send.clicked()) && can_send {
                submit = true;
            }
            if entered {
                // Keep typing after sending.
                edit.request_focus();
            }
        });
        if submit {
            actions.push(UiAction::SendChat(std::mem::take(draft)));
        }
        ui.separator();
        ui.with_layout(Layout::top_down(Align::LEFT), |ui| {
            ScrollArea::vertical()
                .stick_to_bottom(true)
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    if view.lines.is_empty() {
                        ui.label(RichText::new("No messages yet").weak());
                    }
                    for line in view.lines {
                        message(ui, line, view.utc_offset_minutes);
                    }
                });
        });
    });
    actions
}

/// One message: a header line (sender, time) and the wrapped text with its links.
fn message(ui: &mut Ui, line: &ChatLine, offset: i32) {
    ui.horizontal(|ui| {
        let name = RichText::new(&line.from).strong();
        if line.own {
            ui.label(name.color(Color32::from_rgb(90, 160, 230)));
        } else {
            ui.label(name);
        }
        ui.label(
            RichText::new(clock_time(line.sent_ms, offset))
                .small()
                .weak(),
        );
    });
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing.x = 0.0;
        for segment in segments(&line.text) {
            match segment {
                Segment::Text(t) => {
                    ui.label(t);
                }
                Segment::Link(url) => {
                    ui.hyperlink(url);
                }
            }
        }
    });
    ui.add_space(4.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::OutputCommand;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        lines: VecDeque<ChatLine>,
        notice: Option<String>,
        in_channel: bool,
        draft: String,
        actions: Vec<UiAction>,
    }

    fn line(from: &str, own: bool, text: &str, sent_ms: u64) -> ChatLine {
        ChatLine {
            from: from.into(),
            own,
            text: text.into(),
            sent_ms,
        }
    }

    fn harness(lines: Vec<ChatLine>) -> Harness<'static, State> {
        Harness::builder()
            .with_size(egui::Vec2::new(320.0, 400.0))
            .build_ui_state(
                |ui, state: &mut State| {
                    let view = ChatView {
                        lines: &state.lines,
                        notice: state.notice.as_deref(),
                        in_channel: state.in_channel,
                        utc_offset_minutes: 60,
                    };
                    let actions = chat(ui, &view, &mut state.draft);
                    state.actions.extend(actions);
                },
                State {
                    lines: lines.into(),
                    notice: None,
                    in_channel: true,
                    draft: String::new(),
                    actions: Vec::new(),
                },
            )
    }

    // 2026-12-03 17:05 UTC.
    const T: u64 = 1_796_317_500_000;

    #[test]
    fn clock_time_is_the_local_time_of_day() {
        assert_eq!(clock_time(T, 0), "17:05");
        assert_eq!(clock_time(T, 60), "18:05");
        assert_eq!(clock_time(T, -18 * 60), "23:05", "the day before");
        assert_eq!(clock_time(T + 7 * 3_600_000, 0), "00:05");
    }

    #[test]
    fn links_are_found_at_word_starts_without_trailing_punctuation() {
        assert_eq!(
            segments("see https://example.org/a?b=1, then http://x.io."),
            vec![
                Segment::Text("see "),
                Segment::Link("https://example.org/a?b=1"),
                Segment::Text(", then "),
                Segment::Link("http://x.io"),
                Segment::Text("."),
            ]
        );
        assert_eq!(
            segments("nohttps://x.org"),
            vec![Segment::Text("nohttps://x.org")]
        );
        assert_eq!(segments("https://"), vec![Segment::Text("https://")]);
        assert_eq!(segments("ftp://x.org"), vec![Segment::Text("ftp://x.org")]);
        assert_eq!(
            segments("grüße https://ä.de"),
            vec![Segment::Text("grüße "), Segment::Link("https://ä.de")]
        );
        assert_eq!(segments(""), vec![]);
    }

    #[test]
    fn messages_show_sender_time_and_text_and_links_open() {
        let mut h = harness(vec![
            line("bob", false, "hello there", T),
            line(
                "alice",
                true,
                "look at https://example.org/page now",
                T + 60_000,
            ),
        ]);
        h.get_by_label("bob");
        h.get_by_label("18:05");
        h.get_by_label("hello there");
        h.get_by_label("alice");
        h.get_by_label("18:06");
        h.get_by_label("https://example.org/page").click();
        h.step();
        let opened =
            h.output().platform_output.commands.iter().any(
                |c| matches!(c, OutputCommand::OpenUrl(u) if u.url == "https://example.org/page"),
            );
        assert!(opened, "{:?}", h.output().platform_output.commands);
    }

    #[test]
    fn enter_sends_the_typed_message_and_clears_the_line() {
        let mut h = harness(vec![]);
        h.get_by_label("No messages yet");
        h.get_by_label("Message").click();
        h.run();
        h.get_by_label("Message").type_text("hi all");
        h.run();
        h.key_press(Key::Enter);
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::SendChat("hi all".into())]);
        assert_eq!(h.state().draft, "");
        // A blank line sends nothing.
        h.get_by_label("Message").type_text("   ");
        h.run();
        h.key_press(Key::Enter);
        h.run();
        assert_eq!(h.state().actions.len(), 1);
    }

    #[test]
    fn an_overlong_message_is_not_sent_and_says_why() {
        let mut h = harness(vec![]);
        h.state_mut().draft = "x".repeat(MAX_CHAT_CHARS + 1);
        h.run();
        h.get_by_label("the message has 2001 characters; the limit is 2000");
        h.get_by_label("Send").click();
        h.run();
        assert!(h.state().actions.is_empty());
        h.state_mut().draft = "x".repeat(MAX_CHAT_CHARS);
        h.run();
        h.get_by_label("2000 / 2000");
        h.get_by_label("Send").click();
        h.run();
        assert_eq!(h.state().actions.len(), 1);
    }

    #[test]
    fn a_long_message_wraps_inside_the_panel_and_the_view_follows_the_newest() {
        let long = "word ".repeat(200);
        let mut lines: Vec<ChatLine> = (0..30)
            .map(|i| line("bob", false, &format!("message {i}"), T))
            .collect();
        lines.push(line("carol", false, long.trim_end(), T));
        lines.push(line("carol", false, "the newest", T));
        let mut h = harness(lines);
        h.run();
        let wrapped = h.get_by_label(long.trim_end()).rect();
        assert!(wrapped.width() <= 320.0, "wraps: {wrapped:?}");
        assert!(wrapped.height() > 50.0, "on many rows: {wrapped:?}");
        // Stuck to the bottom: the newest message is on screen, the oldest scrolled away.
        let newest = h.get_by_label("the newest").rect();
        assert!(
            newest.bottom() <= 400.0 && newest.top() >= 0.0,
            "{newest:?}"
        );
        let oldest = h.get_by_label("message 0").rect();
        assert!(oldest.bottom() < 0.0, "scrolled away: {oldest:?}");
    }

    #[test]
    fn outside_a_channel_nothing_can_be_sent_and_a_refusal_is_shown() {
        let mut h = harness(vec![]);
        h.state_mut().in_channel = false;
        h.state_mut().notice = Some("not sent: the message is empty".into());
        h.state_mut().draft = "hello".into();
        h.run();
        h.get_by_label("not sent: the message is empty");
        h.get_by_label("Send").click();
        h.run();
        assert!(h.state().actions.is_empty());
    }
}
