//! Continuous batching policy: which sequences run this step and with how
//! many tokens. Running sequences go first (one decode token each, or the
//! next prefill chunk), then waiting ones are admitted in order while the
//! step's token budget, the running cap and the KV reservation allow.

use std::collections::VecDeque;

use super::sequence::Sequence;

/// The limits one step is planned under.
#[derive(Debug, Clone)]
pub struct SchedulerLimits {
    pub max_running: usize,
    pub max_tokens_per_step: usize,
    pub kv_budget_bytes: u64,
    pub kv_bytes_per_token: u64,
}

/// Waiting and running sequences; owned by the engine thread, no locks.
pub struct Scheduler {
    pub limits: SchedulerLimits,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    kv_reserved: u64,
}

/// Why a waiting request can never run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable(pub String);

impl Scheduler {
    /// An empty scheduler.
    pub fn new(limits: SchedulerLimits) -> Self {
        Scheduler {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_reserved: 0,
        }
    }

    /// Nothing to do.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV bytes reserved by running sequences.
    pub fn kv_reserved(&self) -> u64 {
        self.kv_reserved
    }

    /// The reservation a request needs: its prompt plus everything it may generate.
    pub fn reservation(&self, seq: &Sequence) -> u64 {
        (seq.prompt_len() + seq.request.max_tokens) as u64 * self.limits.kv_bytes_per_token
    }

    /// Removes running sequences whose client went away; frees their KV.
    pub fn drop_abandoned(&mut self) -> usize {
        let before = self.running.len() + self.waiting.len();
        let mut freed = 0;
        self.running.retain(|s| {
            let keep = !s.is_abandoned();
            if !keep {
                freed += s.reserved_bytes;
            }
            keep
        });
        self.kv_reserved -= freed;
        self.waiting.retain(|s| !s.is_abandoned());
        before - self.running.len() - self.waiting.len()
    }

    /// Orders running sequences by adapter (stable, so arrival order holds
    /// within a group): each adapter is then one contiguous segment of the
    /// packed step, and its delta is one pair of matmuls.
    pub fn group_by_adapter(&mut self) {
        self.running.sort_by_key(|s| s.request.adapter.as_ref().map_or(0, |a| std::sync::Arc::as_ptr(a) as usize));
    }

    /// Removes a finished running sequence, freeing its reservation.
    pub fn release(&mut self, index: usize) -> Sequence {
        let seq = self.running.swap_remove(index);
        self.kv_reserved -= seq.reserved_bytes;
        seq
    }

    /// Index of the waiting request to admit next: among the first
    /// `FAIR_SCAN` waiting, the oldest of the tenant with the fewest running.
    fn fair_pick(&self) -> Option<usize> {
        const FAIR_SCAN: usize = 256;
        if self.waiting.is_empty() {
            return None;
        }
        let mut running: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for s in &self.running {
            *running.entry(s.request.tenant.as_str()).or_default() += 1;
        }
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.waiting.iter().take(FAIR_SCAN).enumerate() {
            let n = running.get(s.request.tenant.as_str()).copied().unwrap_or(0);
            if best.is_none_or(|(_, b)| n < b) {
                best = Some((i, n));
                if n == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Plans a step: admits what fits and returns, per running index, how
    /// many tokens to feed (0: sits this step out). Waiting requests that can
    /// never fit are returned for the caller to fail.
    pub fn schedule(&mut self) -> (Vec<usize>, Vec<(Sequence, Unschedulable)>) {
        let mut budget = self.limits.max_tokens_per_step;
        let mut plan = Vec::with_capacity(self.running.len());
        // Decoding sequences first: each needs exactly one token.
        for s in &self.running {
            let n = if s.is_prefilling() {
                0
            } else {
                s.pending().min(1)
            };
            budget = budget.saturating_sub(n);
            plan.push(n);
        }
        // Then prefill chunks of already admitted sequences, in order.
        for (i, s) in self.running.iter().enumerate() {
            if s.is_prefilling() && budget > 0 {
                let n = s.pending().min(budget);
                plan[i] = n;
                budget -= n;
            }
        }
        let mut rejected = Vec::new();
        while budget > 0 && self.running.len() < self.limits.max_running {
            // Fair share: the oldest waiting request of the tenant with the
            // fewest running sequences goes first, so one tenant's flood
            // waits behind everyone else's next request, not in front of it.
            let Some(pick) = self.fair_pick() else {
                break;
            };
            if pick != 0 {
                let seq = self.waiting.remove(pick).expect("picked index exists");
                self.waiting.push_front(seq);
            }
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = self.reservation(front);
            if need > self.limits.kv_budget_bytes {
                let seq = self.waiting.pop_front().expect("front exists");
                let msg = format!(
                    "request needs {need} bytes of KV cache (prompt + max_tokens) but the server's budget is {} bytes; lower max_tokens or the prompt",
                    self.limits.kv_budget_bytes
                );
                rejected.push((seq, Unschedulable(msg)));
                continue;
            }
            if self.kv_reserved + need > self.limits.kv_budget_bytes {
                break; // wait for running sequences to finish
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.reserved_bytes = need;
            self.kv_reserved += need;
            let n = seq.pending().min(budget);
            budget -= n;
            self.running.push(seq);
            plan.push(n);
        }
        (plan, rejected)
    }
}
