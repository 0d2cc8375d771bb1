//! One egui frame of the channel overview with 50 channels / 500 users on a 1280x800 screen,
//! headless (no window, no GPU). Measures the panel (layout + shapes) and, separately, the panel
//! plus tessellation, which is what bevy_egui does each frame before upload.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use egui::{CentralPanel, Context, Pos2, RawInput, Rect, Vec2};
use p2p_voice::ui::panels;
use p2p_voice::ui::view::{ChannelView, LinkView, MemberLink, MemberView, OverviewView};
use p2p_voice::voice::{PeerState, RelayVia, Unreachable, UnreachableReason};

fn big_overview(channels: u32, users_per_channel: u32) -> OverviewView {
    let channels = (0..channels)
        .map(|c| ChannelView {
            id: c,
            name: format!("Channel {c}"),
            has_password: c % 5 == 0,
            members: (0..users_per_channel)
                .map(|m| {
                    let id = c * users_per_channel + m;
                    let mut member = MemberView::new(id, format!("user{id}"));
                    member.speaking = id % 3 == 0;
                    member.level = (id % 10) as f32 / 10.0;
                    member.is_self = id == 0;
                    member.link = LinkView {
                        state: match id % 4 {
                            1 => MemberLink::Peer(PeerState::Punching),
                            2 => MemberLink::Peer(PeerState::Unreachable(Unreachable {
                                direct: UnreachableReason::NoAnswer {
                                    candidates: 2,
                                    after: Duration::from_secs(10),
                                },
                                server_relays: false,
                                udp_blocked: false,
                            })),
                            3 if id % 8 == 3 => {
                                MemberLink::Peer(PeerState::Relayed(RelayVia::Member {
                                    user_id: 1,
                                    name: "m1".into(),
                                }))
                            }
                            _ => MemberLink::Peer(PeerState::Direct(([192, 0, 2, 7], 7700).into())),
                        },
                        rtt_ms: Some(20.0 + (id % 50) as f32),
                        loss_pct: Some(0.5),
                        reported_loss_pct: Some(1.0),
                        jitter_ms: Some(4.0),
                        buffer_ms: Some(40.0),
                    };
                    member
                })
                .collect(),
            max_members: Some(users_per_channel + 5),
        })
        .collect();
    OverviewView {
        channels,
        my_channel: Some(0),
    }
}

fn screen_input() -> RawInput {
    RawInput {
        screen_rect: Some(Rect::from_min_size(Pos2::ZERO, Vec2::new(1280.0, 800.0))),
        ..RawInput::default()
    }
}

fn overview_frame(c: &mut Criterion) {
    let view = big_overview(50, 10);
    let ctx = Context::default();
    // The first frames build the font atlas; keep them out of the measurement.
    for _ in 0..3 {
        let _ = ctx.run(screen_input(), |ctx| {
            CentralPanel::default().show(ctx, |ui| panels::overview(ui, &view));
        });
    }

    c.bench_function("overview_frame_50ch_500users", |b| {
        b.iter(|| {
            let output = ctx.run(screen_input(), |ctx| {
                CentralPanel::default().show(ctx, |ui| black_box(panels::overview(ui, &view)));
            });
            black_box(output)
        })
    });

    c.bench_function("overview_frame_and_tessellate_50ch_500users", |b| {
        b.iter(|| {
            let output = ctx.run(screen_input(), |ctx| {
                CentralPanel::default().show(ctx, |ui| black_box(panels::overview(ui, &view)));
            });
            black_box(ctx.tessellate(output.shapes, output.pixels_per_point))
        })
    });
}

criterion_group!(benches, overview_frame);
criterion_main!(benches);
