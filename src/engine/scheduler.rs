//! Continuous batching policy: which sequences run this step and with how
//! many tokens. Running sequences go first (one decode token each, or the
//! next prefill chunk), then waiting ones are admitted in order while the
//! step's token budget, the running cap and the KV reservation allow.
//! Admission is fair across tenants: the tenant with the fewest running
//! sequences goes first, and when a tenant waits below its fair share with
//! no slot free, the newest sequence of the tenant furthest above its share
//! is preempted (its KV freed, recomputed from its tokens when it runs again).

use std::collections::{HashMap, HashSet, VecDeque};

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
    /// Sequences preempted for fairness so far.
    pub preempted: u64,
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
            preempted: 0,
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

    /// Index of the waiting request to admit next: the oldest of the
    /// tenant with the fewest running (the whole queue is looked at, so a
    /// flood of one tenant never hides another's request behind it).
    fn fair_pick(&self) -> Option<usize> {
        let mut running: HashMap<&str, usize> = HashMap::new();
        for s in &self.running {
            *running.entry(s.request.tenant.as_str()).or_default() += 1;
        }
        let mut best: Option<(usize, usize)> = None;
        let mut seen: HashSet<&str> = HashSet::new();
        for (i, s) in self.waiting.iter().enumerate() {
            let tenant = s.request.tenant.as_str();
            if !seen.insert(tenant) {
                continue;
            }
            let n = running.get(tenant).copied().unwrap_or(0);
            if best.is_none_or(|(_, b)| n < b) {
                best = Some((i, n));
                if n == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Gives every waiting tenant room for its fair share of the running
    /// batch (`max_running` over the tenants running or waiting): while one
    /// waits below its share with no slot or KV free for its oldest
    /// request, the newest running sequence of the tenant furthest above
    /// its share goes back to the front of the queue. Nobody is preempted
    /// to bring a tenant above its share, so preemption cannot cycle.
    fn preempt_for_fair_share(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let mut running: HashMap<String, usize> = HashMap::new();
        for s in &self.running {
            *running.entry(s.request.tenant.clone()).or_default() += 1;
        }
        // Each waiting tenant's oldest request's reservation, in queue order.
        let mut waiting: Vec<(String, u64)> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for s in &self.waiting {
            if seen.insert(s.request.tenant.as_str()) {
                waiting.push((s.request.tenant.clone(), self.reservation(s)));
            }
        }
        let tenants = running.len() + waiting.iter().filter(|(t, _)| !running.contains_key(t)).count();
        let share = (self.limits.max_running / tenants.max(1)).max(1);
        for (tenant, need) in waiting {
            if running.get(&tenant).copied().unwrap_or(0) >= share || need > self.limits.kv_budget_bytes {
                continue;
            }
            while self.running.len() >= self.limits.max_running || self.kv_reserved + need > self.limits.kv_budget_bytes {
                let donor = running.iter().filter(|(_, &n)| n > share).max_by_key(|(t, &n)| (n, std::cmp::Reverse((*t).clone()))).map(|(t, _)| t.clone());
                let Some(donor) = donor else { break };
                let newest = self.running.iter().enumerate().filter(|(_, s)| s.request.tenant == donor).max_by_key(|(_, s)| s.submitted).map(|(i, _)| i);
                let Some(i) = newest else { break };
                // `remove`, not `swap_remove`: the running order keeps each adapter one segment.
                let mut seq = self.running.remove(i);
                self.kv_reserved -= seq.reserved_bytes;
                seq.preempt();
                self.waiting.push_front(seq);
                self.preempted += 1;
                if let Some(n) = running.get_mut(&donor) {
                    *n -= 1;
                }
            }
            // It is admitted next (fewest running first); count it so the
            // tenants after it see the batch as it will be.
            *running.entry(tenant).or_default() += 1;
        }
    }

    /// Plans a step: admits what fits and returns, per running index, how
    /// many tokens to feed (0: sits this step out). Waiting requests that can
    /// never fit are returned for the caller to fail.
    pub fn schedule(&mut self) -> (Vec<usize>, Vec<(Sequence, Unschedulable)>) {
        self.preempt_for_fair_share();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::GenerationRequest;
    use crate::engine::sampling::SamplingParams;

    fn seq(tenant: &str, prompt: usize) -> Sequence {
        let request = GenerationRequest {
            prompt: vec![1; prompt],
            params: SamplingParams::default(),
            max_tokens: 8,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            ignore_eos: false,
            adapter: None,
            tenant: tenant.to_string(),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        Sequence::new(request, tx)
    }

    fn scheduler(max_running: usize) -> Scheduler {
        Scheduler::new(SchedulerLimits { max_running, max_tokens_per_step: 512, kv_budget_bytes: 1 << 30, kv_bytes_per_token: 1 })
    }

    fn running_of(s: &Scheduler, tenant: &str) -> usize {
        s.running.iter().filter(|q| q.request.tenant == tenant).count()
    }

    #[test]
    fn a_waiting_tenant_below_its_share_preempts_the_newest_of_the_tenant_above_it() {
        let mut s = scheduler(8);
        for _ in 0..12 {
            s.waiting.push_back(seq("flood", 4));
        }
        s.schedule();
        assert_eq!(running_of(&s, "flood"), 8);
        let newest = s.running.iter().map(|q| q.submitted).max().unwrap();
        // Some decode progress, then a quiet tenant arrives.
        for q in &mut s.running {
            q.fed = 4;
            q.tokens.push(7);
        }
        s.waiting.push_back(seq("quiet", 4));
        s.schedule();
        assert_eq!(running_of(&s, "quiet"), 1, "admitted at once");
        assert_eq!(running_of(&s, "flood"), 7);
        assert_eq!(s.preempted, 1);
        let back = s.waiting.iter().find(|q| q.fed == 0 && q.tokens.len() == 5).expect("the preempted sequence waits, its tokens kept");
        assert_eq!(back.submitted, newest, "the newest one");
        assert!(back.cache.is_none() && back.is_prefilling());
        // The flood stays at or above its share: nothing more is preempted.
        s.schedule();
        assert_eq!(s.preempted, 1);
    }

    #[test]
    fn a_request_behind_a_thousand_of_another_tenant_is_admitted_next() {
        let mut s = scheduler(8);
        for _ in 0..1000 {
            s.waiting.push_back(seq("flood", 2));
        }
        s.schedule();
        s.waiting.push_back(seq("quiet", 2));
        s.schedule();
        assert_eq!(running_of(&s, "quiet"), 1);
    }

    #[test]
    fn tenants_within_their_share_are_never_preempted() {
        let mut s = scheduler(4);
        for t in ["a", "a", "b", "b"] {
            s.waiting.push_back(seq(t, 2));
        }
        s.schedule();
        s.waiting.push_back(seq("a", 2));
        s.waiting.push_back(seq("b", 2));
        s.schedule();
        assert_eq!((running_of(&s, "a"), running_of(&s, "b"), s.preempted), (2, 2, 0));
        // A third tenant's share is 4 / 3 = 1: one of the two (a, by name) yields one slot.
        s.waiting.push_back(seq("c", 2));
        s.schedule();
        assert_eq!((running_of(&s, "c"), s.preempted), (1, 1));
    }
}
