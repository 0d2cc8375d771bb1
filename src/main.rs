//! `p2p-voice`: command-line entry. Parses the mode and builds the Bevy app for it; nothing else.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use p2p_voice::app::{self, HeadlessOptions};
use p2p_voice::audio::{AudioHost, InputSource, OutputSink};
use p2p_voice::config::{hash_password, load_server_file};
use p2p_voice::protocol::{Password, DEFAULT_PORT};
use p2p_voice::server::relay::DEFAULT_RELAY_KBPS;
use p2p_voice::server::{RelayRules, ServerConfig, ServerRules};
use p2p_voice::voice::codec::FrameDuration;
use p2p_voice::voice::net::impair::ImpairConfig;
use p2p_voice::voice::tx::ProcessingConfig;
use p2p_voice::voice::{VoiceConfig, VoiceSetting, VoiceThreadConfig};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "p2p-voice", version, about = "Peer-to-peer voice chat", long_about = None)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Desktop app with its own metadata server inside (the default).
    Host(HostArgs),
    /// Desktop app (or, with --headless, a windowless client) joining someone else's server.
    Client(Box<ClientArgs>),
    /// Dedicated metadata server: headless, no window, no audio.
    Server(ServerArgs),
    /// Print an argon2 hash of a channel password for the channels file.
    HashPassword(HashArgs),
    /// List audio input and output devices.
    Devices(DevicesArgs),
}

#[derive(Args, Clone)]
struct HostArgs {
    /// TCP and UDP port of the embedded server.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address the embedded server listens on (`::`: IPv6 and IPv4).
    #[arg(long, default_value = "::")]
    bind: IpAddr,
    /// Channels file (TOML); the built-in list when absent.
    #[arg(long)]
    channels: Option<PathBuf>,
    /// Username (defaults to the last one used).
    #[arg(long)]
    username: Option<String>,
    /// Channel the host joins as soon as it is connected (it starts in a call).
    #[arg(long, default_value = "Lobby")]
    channel: String,
    /// Where the embedded server keeps its TLS certificate.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Do not let the embedded server relay for guests that cannot reach each other directly
    /// (it relays by default in host mode: the host is in the call anyway).
    #[arg(long)]
    no_relay: bool,
    /// Most each client may send through the embedded server's relay, in kb/s.
    #[arg(long, default_value_t = DEFAULT_RELAY_KBPS)]
    relay_kbps: u32,
    /// Sound system for the microphone and speaker.
    #[arg(long, value_name = AUDIO_HOST_VALUES, default_value_t = AudioHost::Auto)]
    audio_host: AudioHost,
    /// Bring every speaker to the same loudness (before each one's own volume); when absent,
    /// what was last chosen in the window (off at first).
    #[arg(long, value_name = "on|off")]
    normalize_loudness: Option<OnOff>,
    /// Ask the router to open the voice port (PCP, NAT-PMP or UPnP-IGD) and tell peers the
    /// mapped address: reaches peers that hole punching cannot (symmetric NATs). On by
    /// default; the mapping is removed on exit.
    #[arg(long, value_name = "on|off", default_value = "on")]
    port_mapping: OnOff,
    #[command(flatten)]
    capture: CaptureFlags,
    /// Join, leave and mute sounds; when absent, what was last chosen in the window (on at
    /// first).
    #[arg(long, value_name = "on|off")]
    sounds: Option<OnOff>,
}

/// The capture chain's stages, each switchable. When a flag is absent: on for a microphone
/// (in the window, what was last chosen there), off for WAV and tone inputs; the high-pass
/// filter is off for both.
#[derive(Args, Clone, Default)]
struct CaptureFlags {
    /// Noise suppression (RNNoise).
    #[arg(long, value_name = "on|off")]
    noise_suppression: Option<OnOff>,
    /// Echo cancellation: take what the speaker plays out of the microphone (WebRTC AEC3).
    #[arg(long, value_name = "on|off")]
    echo_cancellation: Option<OnOff>,
    /// Automatic gain control: bring the microphone to a steady level (WebRTC AGC2).
    #[arg(long, value_name = "on|off")]
    gain_control: Option<OnOff>,
    /// High-pass filter: take rumble and hum below about 90 Hz out of the microphone (off
    /// unless asked for, microphones included: it costs clean speech some quality).
    #[arg(long, value_name = "on|off")]
    high_pass: Option<OnOff>,
}

impl CaptureFlags {
    /// Noise suppression, `default` when not given.
    fn denoise(&self, default: bool) -> bool {
        self.noise_suppression.map_or(default, |v| v == OnOff::On)
    }

    /// The WebRTC stages, each from its flag or `default`.
    fn processing(&self, default: ProcessingConfig) -> ProcessingConfig {
        let pick = |flag: Option<OnOff>, default: bool| flag.map_or(default, |v| v == OnOff::On);
        ProcessingConfig {
            echo_cancel: pick(self.echo_cancellation, default.echo_cancel),
            gain_control: pick(self.gain_control, default.gain_control),
            high_pass: pick(self.high_pass, default.high_pass),
        }
    }

    /// The stages given explicitly, as settings that win over what the window remembers.
    fn choices(&self) -> impl Iterator<Item = VoiceSetting> {
        let on = |v: OnOff| v == OnOff::On;
        [
            self.noise_suppression
                .map(|v| VoiceSetting::NoiseSuppression(on(v))),
            self.echo_cancellation
                .map(|v| VoiceSetting::EchoCancellation(on(v))),
            self.gain_control.map(|v| VoiceSetting::GainControl(on(v))),
            self.high_pass.map(|v| VoiceSetting::HighPass(on(v))),
        ]
        .into_iter()
        .flatten()
    }
}

/// What `--audio-host` takes (the names depend on the platform; `devices` prints the one used).
const AUDIO_HOST_VALUES: &str = "auto|PulseAudio|ALSA";

#[derive(Args, Clone)]
struct DevicesArgs {
    /// Sound system to list: auto (what the app uses), or one by name.
    #[arg(long, value_name = AUDIO_HOST_VALUES, default_value_t = AudioHost::Auto)]
    audio_host: AudioHost,
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// Address to listen on (`::`: IPv6 and IPv4; `0.0.0.0`: IPv4 only).
    #[arg(long, default_value = "::")]
    bind: IpAddr,
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    #[arg(long)]
    channels: Option<PathBuf>,
    /// Print the bound address as a JSON line on stdout (for scripts).
    #[arg(long)]
    json: bool,
    /// Where the server keeps its TLS certificate (default: the platform data directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Most simultaneous connections from one IP address (IPv6: one /64); overrides the
    /// channels file's `[limits] max_connections_per_prefix` (default 64).
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// Relay sealed voice between members that cannot reach each other directly (symmetric
    /// or carrier NATs). Off by default: the server then never carries voice. It can never
    /// read what it relays.
    #[arg(long)]
    relay: bool,
    /// Most each client may send through the relay, in kb/s.
    #[arg(long, default_value_t = DEFAULT_RELAY_KBPS, requires = "relay")]
    relay_kbps: u32,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Server address, HOST or HOST:PORT.
    #[arg(long)]
    server: Option<String>,
    #[arg(long)]
    username: Option<String>,
    /// Channel to join once connected.
    #[arg(long)]
    channel: Option<String>,
    /// Password of that channel. Prefer the environment variable: a command line is visible
    /// to every local user in the process list and stays in the shell's history.
    #[arg(long, env = "P2P_VOICE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Read the channel password from the first line of this file instead (make it readable
    /// only by you: `chmod 600`). Wins over `--password` and the environment.
    #[arg(long, value_name = "PATH")]
    password_file: Option<std::path::PathBuf>,
    /// Ask for the channel password on the terminal, without echoing it.
    #[arg(long)]
    ask_password: bool,
    /// No window: print events as JSON lines; audio from/to files or a tone.
    #[arg(long)]
    headless: bool,
    /// Seconds to run before exiting (headless).
    #[arg(long)]
    duration: Option<f64>,
    /// Headless input: a WAV file (any rate and channel count; played once, then silence).
    #[arg(long, value_name = "FILE", group = "input")]
    input_wav: Option<PathBuf>,
    /// Headless input: a sine tone of this frequency in Hz.
    #[arg(long, value_name = "HZ", group = "input")]
    input_tone: Option<f32>,
    /// Headless input: silence.
    #[arg(long, group = "input")]
    input_silence: bool,
    /// Repeat --input-wav forever.
    #[arg(long, requires = "input_wav")]
    loop_input: bool,
    /// Headless output: write what you hear to this WAV file (48 kHz mono, 16-bit).
    #[arg(long, value_name = "FILE")]
    output_wav: Option<PathBuf>,
    /// Frame length in milliseconds: 20 (default) or 10 (lower latency, more packets).
    #[arg(long, default_value_t = 20, value_parser = parse_frame_ms)]
    frame_ms: u32,
    /// Opus bitrate in bits per second.
    #[arg(long, default_value_t = 24_000, value_parser = clap::value_parser!(u32).range(6_000..=128_000))]
    bitrate: u32,
    #[command(flatten)]
    capture: CaptureFlags,
    /// Bring every speaker to the same loudness (before each one's own volume): off by
    /// default headless; in the window, what was last chosen there.
    #[arg(long, value_name = "on|off")]
    normalize_loudness: Option<OnOff>,
    /// Send all the time instead of only while the voice activity detector hears speech.
    #[arg(long)]
    always_transmit: bool,
    /// Start muted.
    #[arg(long)]
    mute: bool,
    /// Simulate a bad network on received voice, e.g. loss=0.1,jitter_ms=30,duplicate=0.02,seed=7
    /// (add burst=3 for bursty Gilbert-Elliott loss with a mean run of 3 lost packets).
    #[arg(long, value_name = "SPEC")]
    impair: Option<ImpairConfig>,
    /// Trust the server's certificate even though it differs from the one seen before
    /// (only after checking with the server's operator that it really changed).
    #[arg(long)]
    accept_new_cert: bool,
    /// Headless: use the voice of a member whose identity key changed since it was first seen
    /// here (the warning is still printed). Only after checking with them that it really
    /// changed; the desktop app asks instead.
    #[arg(long)]
    accept_new_identity: bool,
    /// Input device name (desktop app, or headless without --input-*).
    #[arg(long)]
    input_device: Option<String>,
    /// Output device name (desktop app, or headless without --output-wav).
    #[arg(long)]
    output_device: Option<String>,
    /// Sound system the devices are on: auto (the native PulseAudio/PipeWire server when
    /// one runs, else ALSA), or one by name (see `p2p-voice devices`).
    #[arg(long, value_name = AUDIO_HOST_VALUES, default_value_t = AudioHost::Auto)]
    audio_host: AudioHost,
    /// Ask the router to open the voice port (PCP, NAT-PMP or UPnP-IGD) and tell peers the
    /// mapped address: reaches peers that hole punching cannot (symmetric NATs). On by
    /// default in the window, off with --headless (scripts and tests); the mapping is
    /// removed on exit.
    #[arg(long, value_name = "on|off")]
    port_mapping: Option<OnOff>,
    /// Headless: send this chat message to the channel once joined and the peers are
    /// connected (repeatable, sent in order). Members who join later do not get it.
    #[arg(long, value_name = "TEXT")]
    say: Vec<String>,
    /// Join, leave and mute sounds, mixed into what you hear: off by default headless
    /// (scripts and tests want only the call in --output-wav); in the window, what was last
    /// chosen there (on at first).
    #[arg(long, value_name = "on|off")]
    sounds: Option<OnOff>,
    /// Headless: how many connected peers to wait for before sending --say messages (at most
    /// 10 s after joining; then they go to whoever is there).
    #[arg(long, value_name = "N", default_value_t = 1)]
    say_peers: usize,
    /// Headless: run the echo test at start (about 5 s: a test sound through the speaker,
    /// measured in the microphone before and after echo cancellation) and print its result
    /// as an `{"event":"echo_test",...}` line.
    #[arg(long)]
    echo_test: bool,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(Args, Clone)]
struct HashArgs {
    /// The password; read from standard input when absent.
    #[arg(long)]
    password: Option<String>,
}

fn server_config(
    bind: IpAddr,
    port: u16,
    channels: Option<&PathBuf>,
    json: bool,
    data_dir: Option<PathBuf>,
    max_connections_per_ip: Option<usize>,
    relay: Option<RelayRules>,
) -> anyhow::Result<ServerConfig> {
    let file = load_server_file(channels.map(|p| p.as_path()))?;
    let mut limits = file.limits;
    if let Some(max) = max_connections_per_ip {
        limits.max_connections_per_prefix = max;
    }
    Ok(ServerConfig {
        bind,
        port,
        channels: file.channels,
        rules: ServerRules {
            relay,
            prefixes: limits.prefix_widths(),
            passwords: limits.password_rules(),
            ..ServerRules::default()
        },
        announce_json: json,
        data_dir: data_dir.or_else(p2p_voice::tls::default_data_dir),
        limits,
    })
}

fn parse_frame_ms(s: &str) -> Result<u32, String> {
    match s {
        "10" => Ok(10),
        "20" => Ok(20),
        _ => Err(format!("frame length must be 10 or 20 ms, not {s:?}")),
    }
}

fn voice_config(
    frame_ms: u32,
    bitrate: u32,
    (denoise, processing): (bool, ProcessingConfig),
    input: InputSource,
    output: OutputSink,
) -> VoiceThreadConfig {
    let frame = if frame_ms == 10 {
        FrameDuration::Ms10
    } else {
        FrameDuration::Ms20
    };
    let mut voice = VoiceConfig::for_frame(frame);
    voice.bitrate_bps = bitrate;
    voice.capture.denoise = denoise;
    voice.capture.processing = processing;
    VoiceThreadConfig {
        voice,
        input,
        output,
        ..VoiceThreadConfig::default()
    }
}

/// The voice settings the command line gives explicitly, which win over what the window
/// remembers.
fn window_choices(
    normalize_loudness: Option<OnOff>,
    sounds: Option<OnOff>,
    capture: &CaptureFlags,
) -> Vec<VoiceSetting> {
    normalize_loudness
        .map(|v| VoiceSetting::NormalizeLoudness(v == OnOff::On))
        .into_iter()
        .chain(sounds.map(|v| VoiceSetting::Sounds(v == OnOff::On)))
        .chain(capture.choices())
        .collect()
}

fn with_audio_host(mut voice: VoiceThreadConfig, host: AudioHost) -> VoiceThreadConfig {
    voice.audio.host = host;
    voice
}

/// Why no window can open, if none can (see `ui::display_check`).
fn no_display() -> Option<String> {
    use p2p_voice::ui::display_check::{check_display, DisplayCheck};
    match check_display() {
        DisplayCheck::Reachable(_) => None,
        DisplayCheck::Unset => Some("no display found (DISPLAY/WAYLAND_DISPLAY unset)".into()),
        DisplayCheck::Unreachable(why) => Some(why),
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    warn_about_password_on_the_command_line(std::env::args());
    let mode = cli.mode.unwrap_or(Mode::Host(HostArgs {
        port: DEFAULT_PORT,
        bind: "::".parse().expect("literal address"),
        channels: None,
        username: None,
        channel: "Lobby".into(),
        data_dir: None,
        no_relay: false,
        relay_kbps: DEFAULT_RELAY_KBPS,
        audio_host: AudioHost::Auto,
        normalize_loudness: None,
        capture: CaptureFlags::default(),
        port_mapping: OnOff::On,
        sounds: None,
    }));
    match mode {
        Mode::Server(a) => {
            let cfg = server_config(
                a.bind,
                a.port,
                a.channels.as_ref(),
                a.json,
                a.data_dir,
                a.max_connections_per_ip,
                a.relay.then(|| RelayRules::per_client_kbps(a.relay_kbps)),
            )?;
            app::run_server(cfg)
        }
        Mode::Host(a) => {
            let cfg = server_config(
                a.bind,
                a.port,
                a.channels.as_ref(),
                false,
                a.data_dir.clone(),
                None,
                (!a.no_relay).then(|| RelayRules::per_client_kbps(a.relay_kbps)),
            )?;
            if let Some(why) = no_display() {
                eprintln!(
                    "p2p-voice host: {why}, so no window can open; \
                     running the metadata server only on port {}.",
                    a.port
                );
                return app::run_server(cfg);
            }
            let choices = window_choices(a.normalize_loudness, a.sounds, &a.capture);
            let mut voice = VoiceThreadConfig::default();
            voice.voice.capture.denoise = a.capture.denoise(true);
            voice.voice.capture.processing = a.capture.processing(ProcessingConfig::MICROPHONE);
            voice.port_mapping = a.port_mapping == OnOff::On;
            Ok(app::run_desktop(
                Some(cfg),
                a.username,
                None,
                Some((a.channel, None)),
                with_audio_host(voice, a.audio_host),
                choices,
                false,
            )?)
        }
        Mode::Client(a) => {
            let a = *a;
            if a.headless {
                let file_input = a.input_wav.is_some() || a.input_tone.is_some() || a.input_silence;
                let input = if let Some(path) = a.input_wav.clone() {
                    InputSource::Wav {
                        path,
                        looped: a.loop_input,
                    }
                } else if let Some(hz) = a.input_tone {
                    InputSource::Tone { hz, amplitude: 0.3 }
                } else if a.input_silence || a.input_device.is_none() {
                    // Headless means no microphone unless one is named explicitly.
                    InputSource::Silence
                } else {
                    InputSource::Device(a.input_device.clone())
                };
                let output = match a.output_wav.clone() {
                    Some(p) => OutputSink::Wav(p),
                    None if a.output_device.is_some() => {
                        OutputSink::Device(a.output_device.clone())
                    }
                    None => OutputSink::Null,
                };
                let stages = if file_input {
                    (
                        a.capture.denoise(false),
                        a.capture.processing(ProcessingConfig::NONE),
                    )
                } else {
                    (
                        a.capture.denoise(true),
                        a.capture.processing(ProcessingConfig::MICROPHONE),
                    )
                };
                let password = channel_password(&a)?;
                let opts = HeadlessOptions {
                    server: a
                        .server
                        .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_PORT}")),
                    username: a
                        .username
                        .context("--username is required with --headless")?,
                    channel: a.channel,
                    password,
                    duration: a.duration.map(std::time::Duration::from_secs_f64),
                    voice: with_audio_host(
                        {
                            let mut voice = VoiceThreadConfig {
                                impair: a.impair.clone(),
                                port_mapping: a.port_mapping == Some(OnOff::On),
                                ..voice_config(a.frame_ms, a.bitrate, stages, input, output)
                            };
                            voice.voice.normalize_loudness =
                                a.normalize_loudness == Some(OnOff::On);
                            voice.voice.sounds = a.sounds == Some(OnOff::On);
                            voice
                        },
                        a.audio_host,
                    ),
                    always_transmit: a.always_transmit,
                    start_muted: a.mute,
                    accept_new_cert: a.accept_new_cert,
                    accept_new_identity: a.accept_new_identity,
                    say: a.say,
                    say_peers: a.say_peers,
                    echo_test: a.echo_test,
                };
                return Ok(app::run_headless_client(opts));
            }
            if let Some(why) = no_display() {
                anyhow::bail!("{why}; use `p2p-voice client --headless` to run without a window");
            }
            let stages = (
                a.capture.denoise(true),
                a.capture.processing(ProcessingConfig::MICROPHONE),
            );
            let voice = with_audio_host(
                VoiceThreadConfig {
                    impair: a.impair.clone(),
                    port_mapping: a.port_mapping != Some(OnOff::Off),
                    ..voice_config(
                        a.frame_ms,
                        a.bitrate,
                        stages,
                        InputSource::Device(a.input_device.clone()),
                        OutputSink::Device(a.output_device.clone()),
                    )
                },
                a.audio_host,
            );
            let password = channel_password(&a)?;
            let join = a.channel.map(|c| (c, password));
            let choices = window_choices(a.normalize_loudness, a.sounds, &a.capture);
            Ok(app::run_desktop(
                None,
                a.username,
                a.server,
                join,
                voice,
                choices,
                a.accept_new_cert,
            )?)
        }
        Mode::HashPassword(a) => {
            let password = Zeroizing::new(match a.password {
                Some(p) => p,
                // On a terminal the password is not echoed (nor left on screen or in a
                // recording); piped in by a script, it is read as one line.
                None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
                    rpassword::prompt_password("Type the channel password and press Enter: ")?
                }
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    let password = line.trim_end_matches(['\r', '\n']).to_string();
                    zeroize::Zeroize::zeroize(&mut line);
                    password
                }
            });
            if password.is_empty() {
                anyhow::bail!("the password is empty");
            }
            let hash = hash_password(&password).map_err(anyhow::Error::msg)?;
            println!("{hash}");
            eprintln!("Put it in the channels file as: password_hash = \"{hash}\"");
            Ok(ExitCode::SUCCESS)
        }
        Mode::Devices(a) => {
            app::print_devices(a.audio_host)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The channel password, from the first place that has one: `--password-file`, then
/// `--ask-password` (a terminal prompt without echo), then `--password` or `P2P_VOICE_PASSWORD`.
fn channel_password(a: &ClientArgs) -> anyhow::Result<Option<Password>> {
    if let Some(path) = &a.password_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the password file {}", path.display()))?,
        );
        let password = Password::from(text.lines().next().unwrap_or_default());
        if password.is_empty() {
            anyhow::bail!("the password file {} is empty", path.display());
        }
        return Ok(Some(password));
    }
    if a.ask_password {
        let password = rpassword::prompt_password("Channel password: ")
            .context("cannot read the password from the terminal")?;
        return Ok(Some(Password::new(password)));
    }
    Ok(a.password.clone().map(Password::new))
}

/// A password typed as `--password X` can be read by every local user (`ps`) and stays in the
/// shell's history; it still works (scripts rely on it), but say so once.
fn warn_about_password_on_the_command_line(args: impl Iterator<Item = String>) {
    let mut args = args.skip(1);
    let given = args.any(|a| a == "--password" || a.starts_with("--password="));
    if given {
        eprintln!(
            "p2p-voice: warning: --password is visible to other users of this machine in the \
             process list; set P2P_VOICE_PASSWORD instead"
        );
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("p2p-voice: {e:#}");
            ExitCode::from(2)
        }
    }
}
