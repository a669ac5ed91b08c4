//! Prometheus registry and the metric names, shared by the API and the engine.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports. Cheap to clone handles live inside.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_latency: HistogramVec,
    pub time_to_first_token: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub running_sequences: IntGauge,
    pub waiting_sequences: IntGauge,
    pub batch_size: Histogram,
    pub step_tokens: Histogram,
    pub kv_cache_bytes: IntGauge,
    pub kv_cache_capacity_bytes: IntGauge,
    pub adapters_resident: IntGauge,
    pub adapters_resident_bytes: IntGauge,
    pub adapter_loads: IntCounter,
    pub adapter_load_seconds: Histogram,
    pub adapter_cache_hits: IntCounter,
    pub adapter_cache_misses: IntCounter,
    /// Per tenant and adapter (`base` for the base model).
    pub adapter_requests: IntCounterVec,
    pub adapter_prompt_tokens: IntCounterVec,
    pub adapter_generated_tokens: IntCounterVec,
    /// Learner jobs by outcome (succeeded, rejected, failed, cancelled).
    pub learner_jobs: IntCounterVec,
    /// Training tokens per second of the last run.
    pub learner_train_tokens_per_second: prometheus::Gauge,
    /// The last candidate's eval figures by tenant, adapter and figure.
    pub adapter_eval: prometheus::GaugeVec,
    /// Promotions by source (upload, learner, manual) and rollbacks.
    pub adapter_promotions: IntCounterVec,
    pub adapter_rollbacks: IntCounter,
    /// Whether per-tenant series carry tenant and adapter names
    /// (`metrics.tenant_labels`); off, they read "" and sum over all.
    tenant_labels: bool,
    /// Sequences preempted (their KV freed, recomputed later) to give
    /// another tenant its fair share of the running batch.
    pub preemptions: IntCounter,
}

impl Metrics {
    /// Metrics whose per-tenant series are labelled with tenant and adapter
    /// names only when `tenant_labels` (otherwise summed over all of them).
    pub fn with_tenant_labels(tenant_labels: bool) -> Self {
        Metrics { tenant_labels, ..Self::new() }
    }

    /// The labels a tenant's series get: its names, or "" when hidden.
    pub fn tenant_label<'a>(&self, name: &'a str) -> &'a str {
        if self.tenant_labels {
            name
        } else {
            ""
        }
    }

    /// Creates and registers all metrics; names are prefixed `lifelora_`.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("lifelora".into()), None)
            .expect("static registry prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["route", "status"],
        )
        .expect("valid metric");
        let request_latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(exp_buckets(0.001, 2.0, 18)),
            &["route"],
        )
        .expect("valid metric");
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time from request to first token",
            )
            .buckets(exp_buckets(0.001, 2.0, 16)),
        )
        .expect("valid metric");
        let prompt_tokens = IntCounter::new("prompt_tokens_total", "Prompt tokens processed")
            .expect("valid metric");
        let generated_tokens =
            IntCounter::new("generated_tokens_total", "Tokens generated").expect("valid metric");
        let running_sequences =
            IntGauge::new("running_sequences", "Sequences in the running batch")
                .expect("valid metric");
        let waiting_sequences =
            IntGauge::new("waiting_sequences", "Sequences waiting for admission")
                .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Sequences per engine step")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )
        .expect("valid metric");
        let step_tokens = Histogram::with_opts(
            HistogramOpts::new("step_tokens", "Tokens per engine step")
                .buckets(exp_buckets(1.0, 2.0, 14)),
        )
        .expect("valid metric");
        let kv_cache_bytes = IntGauge::new(
            "kv_cache_bytes",
            "KV cache bytes reserved by admitted sequences",
        )
        .expect("valid metric");
        let kv_cache_capacity_bytes =
            IntGauge::new("kv_cache_capacity_bytes", "KV cache budget in bytes")
                .expect("valid metric");
        let adapters_resident = IntGauge::new("adapters_resident", "Adapter versions loaded in memory").expect("valid metric");
        let adapters_resident_bytes =
            IntGauge::new("adapters_resident_bytes", "Bytes held by loaded adapters").expect("valid metric");
        let adapter_loads = IntCounter::new("adapter_loads_total", "Adapter versions loaded from the store").expect("valid metric");
        let adapter_load_seconds = Histogram::with_opts(
            HistogramOpts::new("adapter_load_seconds", "Time to load and validate an adapter version").buckets(exp_buckets(0.0005, 2.0, 14)),
        )
        .expect("valid metric");
        let adapter_cache_hits = IntCounter::new("adapter_cache_hits_total", "Adapter lookups served from memory").expect("valid metric");
        let adapter_cache_misses =
            IntCounter::new("adapter_cache_misses_total", "Adapter lookups that loaded from the store").expect("valid metric");
        let by_adapter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["tenant", "adapter"]).expect("valid metric")
        };
        let adapter_requests = by_adapter("adapter_requests_total", "Generation requests by tenant and adapter");
        let adapter_prompt_tokens = by_adapter("adapter_prompt_tokens_total", "Prompt tokens by tenant and adapter");
        let adapter_generated_tokens = by_adapter("adapter_generated_tokens_total", "Generated tokens by tenant and adapter");
        let learner_jobs = IntCounterVec::new(Opts::new("learner_jobs_total", "Learner runs by outcome"), &["outcome"]).expect("valid metric");
        let learner_train_tokens_per_second =
            prometheus::Gauge::new("learner_train_tokens_per_second", "Training throughput of the last learner run").expect("valid metric");
        let adapter_eval = prometheus::GaugeVec::new(
            Opts::new("adapter_eval", "Last learner candidate's eval figures (valid_loss, base_kl, base_top1_agreement)"),
            &["tenant", "adapter", "figure"],
        )
        .expect("valid metric");
        let adapter_promotions =
            IntCounterVec::new(Opts::new("adapter_promotions_total", "Versions made current, by source"), &["source"]).expect("valid metric");
        let adapter_rollbacks = IntCounter::new("adapter_rollbacks_total", "Rollbacks to an earlier version").expect("valid metric");
        let preemptions = IntCounter::new(
            "preemptions_total",
            "Running sequences preempted (KV freed, recomputed later) so a waiting tenant gets its fair share",
        )
        .expect("valid metric");
        let m = Metrics {
            tenant_labels: true,
            preemptions,
            learner_jobs,
            learner_train_tokens_per_second,
            adapter_eval,
            adapter_promotions,
            adapter_rollbacks,
            registry,
            requests,
            request_latency,
            time_to_first_token,
            prompt_tokens,
            generated_tokens,
            running_sequences,
            waiting_sequences,
            batch_size,
            step_tokens,
            kv_cache_bytes,
            kv_cache_capacity_bytes,
            adapters_resident,
            adapters_resident_bytes,
            adapter_loads,
            adapter_load_seconds,
            adapter_cache_hits,
            adapter_cache_misses,
            adapter_requests,
            adapter_prompt_tokens,
            adapter_generated_tokens,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_latency.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.running_sequences.clone()),
            Box::new(m.waiting_sequences.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.step_tokens.clone()),
            Box::new(m.kv_cache_bytes.clone()),
            Box::new(m.kv_cache_capacity_bytes.clone()),
            Box::new(m.adapters_resident.clone()),
            Box::new(m.adapters_resident_bytes.clone()),
            Box::new(m.adapter_loads.clone()),
            Box::new(m.adapter_load_seconds.clone()),
            Box::new(m.adapter_cache_hits.clone()),
            Box::new(m.adapter_cache_misses.clone()),
            Box::new(m.adapter_requests.clone()),
            Box::new(m.adapter_prompt_tokens.clone()),
            Box::new(m.adapter_generated_tokens.clone()),
            Box::new(m.learner_jobs.clone()),
            Box::new(m.learner_train_tokens_per_second.clone()),
            Box::new(m.adapter_eval.clone()),
            Box::new(m.adapter_promotions.clone()),
            Box::new(m.adapter_rollbacks.clone()),
            Box::new(m.preemptions.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Counts one request's tokens for its tenant and adapter.
    pub fn record_usage(&self, tenant: &str, adapter: &str, prompt_tokens: usize, generated_tokens: usize) {
        let labels = [self.tenant_label(tenant), self.tenant_label(adapter)];
        self.adapter_requests.with_label_values(&labels).inc();
        self.adapter_prompt_tokens.with_label_values(&labels).inc_by(prompt_tokens as u64);
        self.adapter_generated_tokens.with_label_values(&labels).inc_by(generated_tokens as u64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn exp_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).unwrap_or_else(|_| vec![start])
}
