//! Which waiting request the engine prefills next: head-of-line protection.
//!
//! A long prefill (at least `--long-prefill-token-threshold` prompt tokens) holds the ranks for
//! its whole length, so short requests may overtake waiting long ones; each class is served
//! first come, first served, and a long request is overtaken by at most `--max-num-seqs` short
//! ones, so it cannot starve. Prefills run one at a time (at most one long prefill in flight).
//! With `--max-num-seqs 1` nothing overtakes: the one-request-at-a-time server, first come, first
//! served (the batching benchmarks' peer).

/// What the scheduler knows of a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Prompt tokens.
    pub tokens: usize,
    /// Short requests that went before it while it waited.
    pub overtaken: usize,
}

/// The policy's settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Prompts of at least this many tokens are long.
    pub long_threshold: usize,
    /// Short requests that may overtake one long request.
    pub max_overtakes: usize,
}

impl Policy {
    /// The server's policy: short requests overtake long ones only where several sequences run
    /// at once (`max_num_seqs` > 1), each long request at most `max_num_seqs` times.
    pub fn new(long_threshold: usize, max_num_seqs: usize) -> Self {
        Policy {
            long_threshold,
            max_overtakes: if max_num_seqs > 1 { max_num_seqs } else { 0 },
        }
    }

    fn long(&self, w: &Waiting) -> bool {
        w.tokens >= self.long_threshold
    }

    /// The request to prefill next among `waiting` (oldest first), and the bookkeeping: every
    /// long request it overtakes counts it. None when nothing waits.
    pub fn pick(&self, waiting: &mut [Waiting]) -> Option<usize> {
        let first_long = waiting.iter().position(|w| self.long(w));
        let first_short = waiting.iter().position(|w| !self.long(w));
        let pick = match (first_short, first_long) {
            (Some(s), Some(l)) if s > l && waiting[l].overtaken >= self.max_overtakes => l,
            (Some(s), _) => s,
            (None, l) => l?,
        };
        for w in waiting[..pick].iter_mut() {
            w.overtaken += 1;
        }
        Some(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(tokens: &[usize]) -> Vec<Waiting> {
        tokens
            .iter()
            .map(|&tokens| Waiting {
                tokens,
                overtaken: 0,
            })
            .collect()
    }

    /// Picks until empty; the prompt lengths in the order served.
    fn serve(p: Policy, q: &mut Vec<Waiting>) -> Vec<usize> {
        let mut order = vec![];
        while let Some(i) = p.pick(q) {
            order.push(q.remove(i).tokens);
        }
        order
    }

    const P: Policy = Policy {
        long_threshold: 1000,
        max_overtakes: 2,
    };

    #[test]
    fn short_requests_overtake_long_ones_in_order() {
        // Long 5000 and 3000 wait; shorts 10, 20 arrive behind them: they go first, FIFO.
        let mut q = queue(&[5000, 3000, 10, 20]);
        assert_eq!(serve(P, &mut q), vec![10, 20, 5000, 3000]);
    }

    #[test]
    fn a_long_request_is_overtaken_at_most_max_overtakes_times() {
        let mut q = queue(&[5000, 1, 2, 3, 4, 6000, 7]);
        // 1 and 2 overtake 5000 (its limit), then 5000; 3, 4 and 7 go before 6000.
        assert_eq!(serve(P, &mut q), vec![1, 2, 5000, 3, 4, 7, 6000]);
    }

    #[test]
    fn one_class_is_first_come_first_served() {
        assert_eq!(serve(P, &mut queue(&[3, 1, 2])), vec![3, 1, 2]);
        assert_eq!(
            serve(P, &mut queue(&[3000, 1000, 2000])),
            vec![3000, 1000, 2000]
        );
        assert_eq!(serve(P, &mut queue(&[])), Vec::<usize>::new());
    }

    #[test]
    fn one_sequence_at_a_time_is_first_come_first_served() {
        let p = Policy::new(1000, 1);
        assert_eq!(
            serve(p, &mut queue(&[5000, 10, 3000, 20])),
            vec![5000, 10, 3000, 20]
        );
        assert_eq!(Policy::new(1000, 16).max_overtakes, 16);
    }

    #[test]
    fn arrivals_between_picks_wait_their_turn() {
        let mut q = queue(&[5000, 1]);
        assert_eq!(P.pick(&mut q), Some(1));
        q.remove(1);
        q.extend(queue(&[2, 3]));
        // 5000 was overtaken once; one more short may go first, then it runs.
        assert_eq!(serve(P, &mut q), vec![2, 5000, 3]);
    }
}
