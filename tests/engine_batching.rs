//! Continuous batching on the built-in model: late requests join a running
//! batch, abandoned sequences are freed at once, and a full queue refuses
//! instead of hanging.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use lifelora::config::Settings;
use lifelora::engine::{EngineError, EngineHandle, Event, GenerationRequest, SamplingParams};
use lifelora::metrics::Metrics;
use lifelora::model::builtin::load_builtin;

fn engine(max_running: usize, max_waiting: usize) -> (EngineHandle, Metrics) {
    let mut s = Settings::load_with_env(None, Vec::new()).unwrap().engine;
    s.max_running = max_running;
    s.max_waiting = max_waiting;
    let model = Arc::new(load_builtin(DType::F32, &Device::Cpu).unwrap());
    let metrics = Metrics::new();
    (
        EngineHandle::start(model, &s, metrics.clone()).unwrap(),
        metrics,
    )
}

fn request(max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: vec![1, 72, 105],
        params: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        stop: vec![],
        logprobs: None,
        prompt_logprobs: None,
        ignore_eos: true,
        adapter: None,
        tenant: String::new(),
    }
}

/// Receives until Done; returns the number of tokens seen.
async fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> usize {
    let mut n = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } => n += 1,
            Event::Done { .. } => return n,
            Event::Error(e) => panic!("engine error: {e}"),
            Event::Prompt { .. } => {}
        }
    }
    panic!("stream ended without Done")
}

#[tokio::test]
async fn a_late_request_joins_the_running_batch() {
    let (engine, metrics) = engine(8, 16);
    let mut long = engine.submit(request(1500)).unwrap();
    // Wait until the long one is decoding.
    assert!(matches!(long.recv().await, Some(Event::Token { .. })));
    let short = engine.submit(request(5)).unwrap();
    assert_eq!(drain(short).await, 5);
    // The long sequence is still running when the short one is done: they shared steps.
    let rest = drain(long).await;
    assert!(
        rest > 0,
        "long request finished before the short one joined"
    );
    assert!(
        metrics.batch_size.get_sample_sum() > metrics.batch_size.get_sample_count() as f64,
        "no step ran 2+ sequences"
    );
    engine.shutdown();
}

#[tokio::test]
async fn greedy_output_does_not_depend_on_batch_company() {
    let (engine, _) = engine(8, 16);
    let collect = |rx: tokio::sync::mpsc::UnboundedReceiver<Event>| async move {
        let mut rx = rx;
        let mut ids = vec![];
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Done { .. } => break,
                _ => {}
            }
        }
        ids
    };
    let alone = collect(engine.submit(request(40)).unwrap()).await;
    let mut others = vec![];
    for i in 0..6 {
        let mut r = request(30 + i * 7);
        r.prompt = vec![1, 40 + i as u32, 50, 60 + i as u32];
        others.push(engine.submit(r).unwrap());
    }
    let together = collect(engine.submit(request(40)).unwrap()).await;
    assert_eq!(alone, together);
    for o in others {
        drain(o).await;
    }
    engine.shutdown();
}

#[tokio::test]
async fn an_abandoned_sequence_is_freed_at_once() {
    let (engine, metrics) = engine(1, 16);
    let mut rx = engine.submit(request(2000)).unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
    drop(rx);
    // With one slot, the next request can only run once the first is freed.
    let next = engine.submit(request(3)).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), drain(next))
            .await
            .unwrap(),
        3
    );
    assert!(
        metrics.generated_tokens.get() < 1000,
        "abandoned sequence kept generating: {}",
        metrics.generated_tokens.get()
    );
    engine.shutdown();
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_accepted_requests_finish() {
    let (engine, _) = engine(1, 2);
    let mut accepted = vec![];
    let mut refused = 0;
    for _ in 0..6 {
        match engine.submit(request(200)) {
            Ok(rx) => accepted.push(rx),
            Err(EngineError::QueueFull { .. } | EngineError::TenantQueueFull { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 3, "refused {refused}");
    for rx in accepted {
        assert_eq!(drain(rx).await, 200);
    }
    engine.shutdown();
}

#[tokio::test]
async fn a_request_larger_than_the_kv_budget_fails_with_a_message() {
    let mut s = Settings::load_with_env(None, Vec::new()).unwrap().engine;
    s.kv_cache_bytes = 4096;
    let model = Arc::new(load_builtin(DType::F32, &Device::Cpu).unwrap());
    let engine = EngineHandle::start(model, &s, Metrics::new()).unwrap();
    let mut rx = engine.submit(request(100)).unwrap();
    match rx.recv().await {
        Some(Event::Error(m)) => assert!(m.contains("KV cache"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    engine.shutdown();
}

#[tokio::test]
async fn a_tenant_flooding_the_queue_does_not_keep_another_waiting_behind_it() {
    let (engine, _) = engine(2, 64);
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut submit = |tenant: &str| {
        let rx = engine.submit(GenerationRequest { tenant: tenant.to_string(), ..request(40) }).unwrap();
        let (done, tenant) = (done.clone(), tenant.to_string());
        tasks.push(tokio::spawn(async move {
            drain(rx).await;
            done.lock().unwrap().push(tenant);
        }));
    };
    for _ in 0..10 {
        submit("flood");
    }
    submit("quiet");
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    let quiet_at = order.iter().position(|t| t == "quiet").unwrap();
    // First in first out would finish it last (11th); a fair share admits it at the first free slot.
    assert!(quiet_at <= 3, "the quiet tenant finished {}th: {order:?}", quiet_at + 1);
    engine.shutdown();
}
