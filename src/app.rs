//! Builds the Bevy app for each mode. `main.rs` parses arguments and calls one of these.

use std::process::ExitCode;
use std::time::Duration;

use bevy::app::{AppExit, ScheduleRunnerPlugin};
use bevy::log::LogPlugin;
use bevy::prelude::*;

use crate::client::ClientNetPlugin;
pub use crate::headless::HeadlessOptions;
use crate::headless::HeadlessPlugin;
use crate::protocol::Password;
use crate::server::{ServerConfig, ServerPlugin};
use crate::ui::perf::PerfPlugin;
use crate::ui::screenshot::{ScreenshotPlan, ScreenshotPlugin};
use crate::ui::{UiOptions, UiPlugin};
use crate::voice::{VoicePlugin, VoiceThreadConfig};

fn exit_code(exit: AppExit) -> ExitCode {
    match exit {
        AppExit::Success => ExitCode::SUCCESS,
        AppExit::Error(code) => ExitCode::from(code.get()),
    }
}

fn log_plugin() -> LogPlugin {
    LogPlugin {
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,p2p_voice=info".into()),
        ..default()
    }
}

/// Raises the open-file limit to the hard limit: every client is a socket, and the common
/// default of 1024 would stop a server at about a thousand people.
fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                info!(
                    "open-file limit raised from {} to {}",
                    lim.rlim_cur, lim.rlim_max
                );
            }
        }
    }
}

/// `p2p-voice server`: headless Bevy ticking about every millisecond; no window, no audio.
pub fn run_server(cfg: ServerConfig) -> anyhow::Result<ExitCode> {
    raise_fd_limit();
    let plugin = ServerPlugin::bind(cfg)?;
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_millis(1))),
        log_plugin(),
        plugin,
    ));
    // The server's systems form one chain, so a thread pool has nothing to run in parallel;
    // waking it 1,000 times a second only costs futex calls and context switches (a fifth
    // of the server's CPU at 10,000 clients). One thread runs the whole schedule instead.
    for (_, schedule) in app
        .world_mut()
        .resource_mut::<bevy::ecs::schedule::Schedules>()
        .iter_mut()
    {
        schedule.set_executor_kind(bevy::ecs::schedule::ExecutorKind::SingleThreaded);
    }
    Ok(exit_code(app.run()))
}

/// `p2p-voice client --headless`.
pub fn run_headless_client(opts: HeadlessOptions) -> ExitCode {
    let mut app = App::new();
    app.add_plugins((
        // Voice has its own thread; the control plane is fine with a 5 ms tick.
        MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_millis(5))),
        log_plugin(),
        ClientNetPlugin {
            accept_new_cert: opts.accept_new_cert,
            // Nobody to ask: trust on first use, as scripts expect.
            ask_first_use: false,
        },
        VoicePlugin(opts.voice.clone()),
        HeadlessPlugin(opts),
    ));
    exit_code(app.run())
}

/// The address people on other machines should type to reach a server on `port`: this
/// machine's primary LAN address (found by asking the routing table; nothing is sent).
pub fn advertised_address(port: u16) -> String {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect("192.0.2.1:9")?; // TEST-NET-1: a route lookup only, no packet leaves
        s.local_addr()
    });
    match probe {
        Ok(a) if !a.ip().is_unspecified() => format!("{}:{port}", a.ip()),
        _ => format!("127.0.0.1:{port}"),
    }
}

/// The desktop window (`host` with an embedded server, or `client`).
pub fn run_desktop(
    server: Option<ServerConfig>,
    username: Option<String>,
    connect_to: Option<String>,
    join: Option<(String, Option<Password>)>,
    voice: VoiceThreadConfig,
    voice_choices: Vec<crate::voice::VoiceSetting>,
    accept_new_cert: bool,
) -> anyhow::Result<ExitCode> {
    use bevy::window::{Window, WindowPlugin};
    use bevy_egui::EguiPlugin;

    let devices = crate::audio::list_devices(voice.audio.host).ok();
    let names = |v: &[crate::audio::DeviceInfo]| v.iter().map(|d| d.name.clone()).collect();
    let mut ui = UiOptions {
        input_devices: devices
            .as_ref()
            .map(|d| names(&d.inputs))
            .unwrap_or_default(),
        output_devices: devices
            .as_ref()
            .map(|d| names(&d.outputs))
            .unwrap_or_default(),
        username: username.clone(),
        join,
        voice_choices,
        ..Default::default()
    };
    let mut app = App::new();
    // Devices plugged in later show up in the pickers (and a picked one that comes back is
    // used again); without a device list to start from there is nothing to follow.
    if let Some(shown) = devices.clone() {
        match crate::audio::device_watch::DeviceWatch::spawn(voice.audio.host, shown.clone()) {
            Ok(watch) => {
                app.insert_resource(crate::ui::devices::WatchedDevices { watch, shown });
            }
            Err(e) => warn!("device list will not follow hot-plugging: {e}"),
        }
    }
    app.add_plugins(
        DefaultPlugins
            .set(WindowPlugin {
                primary_window: Some(Window {
                    title: "p2p-voice".into(),
                    resolution: (1100.0, 720.0).into(),
                    ..default()
                }),
                ..default()
            })
            .set(log_plugin()),
    );
    // A person is there to compare a new server's fingerprint before trusting it, except in
    // host mode, whose client connects to its own embedded server.
    let ask_first_use = server.is_none();
    if let Some(cfg) = server {
        raise_fd_limit();
        let port = cfg.port;
        let plugin = ServerPlugin::bind(cfg)?;
        let port = plugin.local_addr().map(|a| a.port()).unwrap_or(port);
        app.add_plugins(plugin);
        ui.host_address = Some(advertised_address(port));
        ui.host_port = Some(port);
        // This machine's addresses as the voice plane finds its own (the route's source
        // address, and one of the other family); a documentation address stands for "a
        // guest somewhere", so loopback is not the answer.
        ui.host_local = crate::voice::thread::local_candidates(port, ([192, 0, 2, 1], 9).into());
        ui.server = format!("127.0.0.1:{port}");
        ui.auto_connect = true;
    } else {
        let settings = crate::config::ClientSettings::load();
        ui.auto_connect = connect_to.is_some() && username.is_some();
        ui.server = connect_to
            .or(settings.server)
            .unwrap_or_else(|| format!("127.0.0.1:{}", crate::protocol::DEFAULT_PORT));
    }
    app.add_plugins((
        EguiPlugin::default(),
        ClientNetPlugin {
            accept_new_cert,
            ask_first_use,
        },
        VoicePlugin(voice),
        UiPlugin(ui),
        PerfPlugin,
    ));
    if let Some(plan) = ScreenshotPlan::from_env() {
        app.add_plugins(ScreenshotPlugin(plan));
    }
    Ok(exit_code(app.run()))
}

/// `p2p-voice devices`.
pub fn print_devices(host: crate::audio::AudioHost) -> anyhow::Result<()> {
    let list = crate::audio::list_devices(host)?;
    println!("audio host: {}", list.host);
    if list.host.contains("Pulse") {
        match crate::audio::sound_server_name() {
            Some(name) => println!("sound server: {name}"),
            None => println!("sound server: none answers on the PulseAudio protocol"),
        }
    }
    println!(
        "available hosts: {} (pick one with --audio-host)",
        crate::audio::AudioHost::available().join(", ")
    );
    println!("inputs:");
    if list.inputs.is_empty() {
        println!("  (none)");
    }
    for d in &list.inputs {
        println!(
            "  {}{}",
            d.name,
            if d.is_default { "  [default]" } else { "" }
        );
    }
    println!("outputs:");
    if list.outputs.is_empty() {
        println!("  (none)");
    }
    for d in &list.outputs {
        println!(
            "  {}{}",
            d.name,
            if d.is_default { "  [default]" } else { "" }
        );
    }
    Ok(())
}
