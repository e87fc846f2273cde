//! Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling from a
//! seeded RNG, so a seed reproduces a run.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Chooses next tokens from logits.
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    /// Greedy at temperature 0, else temperature and top-p sampling seeded by `seed`.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Whether it always takes the largest logit (the device may then pick it:
    /// [`apb_kernels::argmax_rows`]).
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Picks a token id from f32 logits over the vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - m) / self.temperature).exp()))
            .collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p.1;
                acc >= self.top_p
            });
            probs.truncate(keep.map(|k| k + 1).unwrap_or(probs.len()));
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

/// Index of the largest logit (lowest index on ties): greedy decoding's choice.
pub use apb_kernels::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(0.0, 1.0, 1).sample(&logits), 1);
        let a: Vec<u32> = (0..20)
            .scan(Sampler::new(1.0, 0.9, 7), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..20)
            .scan(Sampler::new(1.0, 0.9, 7), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
        // top-p 0.9 keeps only ids 1 and 2 (their mass is > 0.9).
        assert!(a.iter().all(|&t| t == 1 || t == 2), "{a:?}");
        assert!(a.contains(&1) && a.contains(&2));
    }
}
