//! The pseudo-random stream of CPython's `random.Random` (Mersenne Twister MT19937), as far
//! as the language detector uses it: seeding from a non-negative integer, `getrandbits(k)`
//! for `k <= 32`, `random()`, `gauss()` (Python's Box-Muller variant that caches the second
//! value) and `choice()` (`_randbelow` by rejection on `getrandbits`).
//!
//! The reference seeds its detector (`DetectorFactory.seed = 0`) and reseeds before every
//! detection; reproducing the draws exactly is what makes our verdicts equal to its own,
//! including on texts where the answer depends on the draws (short or mixed texts).

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// `random.Random` state: the MT19937 words, the position in them and the cached
/// second Gaussian value (`gauss_next`).
pub(crate) struct PyRandom {
    mt: [u32; N],
    index: usize,
    gauss_next: Option<f64>,
}

impl PyRandom {
    /// `random.Random(seed)` for an integer seed: the absolute value split into 32-bit
    /// words (least significant first, at least one) fed to MT19937's `init_by_array`.
    pub(crate) fn new(seed: u64) -> Self {
        let mut r = PyRandom {
            mt: [0; N],
            index: N,
            gauss_next: None,
        };
        let key: &[u32] = if seed >> 32 == 0 {
            &[seed as u32]
        } else {
            &[seed as u32, (seed >> 32) as u32]
        };
        r.init_by_array(key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let mut i = 1;
        let mut j = 0;
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    /// The next tempered 32-bit output (`genrand_uint32`).
    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & UPPER_MASK) | (self.mt[(k + 1) % N] & LOWER_MASK);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for `1 <= k <= 32`.
    pub(crate) fn getrandbits(&mut self, k: u32) -> u32 {
        debug_assert!((1..=32).contains(&k));
        self.next_u32() >> (32 - k)
    }

    /// `random()`: 53 random bits as a float in [0, 1).
    pub(crate) fn random(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `gauss(mu, sigma)`: Box-Muller on two `random()` draws, returning the cosine
    /// value and keeping the sine value for the next call.
    pub(crate) fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        let z = match self.gauss_next.take() {
            Some(z) => z,
            None => {
                let x2pi = self.random() * std::f64::consts::TAU;
                let g2rad = (-2.0 * (1.0 - self.random()).ln()).sqrt();
                self.gauss_next = Some(x2pi.sin() * g2rad);
                x2pi.cos() * g2rad
            }
        };
        mu + z * sigma
    }

    /// `_randbelow(n)` for `1 <= n < 2^32`: `getrandbits(n.bit_length())` until below `n`.
    pub(crate) fn randbelow(&mut self, n: usize) -> usize {
        assert!(n > 0 && n <= u32::MAX as usize, "randbelow({n})");
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `choice(seq)`.
    pub(crate) fn choice<'a, T>(&mut self, seq: &'a [T]) -> &'a T {
        &seq[self.randbelow(seq.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3.11:
    //   r = random.Random(); r.seed(S); ...

    #[test]
    fn getrandbits_matches_cpython() {
        let mut r = PyRandom::new(0);
        let got: Vec<u32> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(got, [3_626_764_237, 1_654_615_998, 3_255_389_356]);
        assert_eq!(PyRandom::new(7).getrandbits(32), 1_390_851_128);
        let mut r = PyRandom::new(12_345_678_901_234_567_890);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32)],
            [2_199_100_970, 3_695_432_519]
        );
    }

    #[test]
    fn random_matches_cpython() {
        let mut r = PyRandom::new(0);
        let got: Vec<f64> = (0..3).map(|_| r.random()).collect();
        assert_eq!(
            got,
            [
                0.844_421_851_525_048_1,
                0.757_954_402_940_302_5,
                0.420_571_580_830_845
            ]
        );
    }

    #[test]
    fn gauss_matches_cpython() {
        let mut r = PyRandom::new(0);
        let got: Vec<f64> = (0..5).map(|_| r.gauss(0.0, 1.0)).collect();
        assert_eq!(
            got,
            [
                0.941_715_404_680_664_4,
                -1.396_578_104_701_149_8,
                -0.679_714_448_078_421_1,
                0.370_503_567_460_659_8,
                -1.016_348_894_188_071,
            ]
        );
    }

    /// The interleaving langdetect does: a Gaussian, choices, then the cached Gaussian
    /// (no draw), then a fresh pair.
    #[test]
    fn interleaved_stream_matches_cpython() {
        // g = r.gauss(0.0, 1.0); c = [r.choice(range(1000)) for _ in range(3)];
        // g2 = r.gauss(0.0, 1.0); g3 = r.gauss(0.0, 1.0);
        // [r.choice(range(7)) for _ in range(10)]; [r.choice(range(1)) for _ in range(2)];
        // r.getrandbits(32)
        let mut r = PyRandom::new(0);
        let range1000: Vec<usize> = (0..1000).collect();
        let range7: Vec<usize> = (0..7).collect();
        assert_eq!(r.gauss(0.0, 1.0), 0.941_715_404_680_664_4);
        let c: Vec<usize> = (0..3).map(|_| *r.choice(&range1000)).collect();
        assert_eq!(c, [430, 41, 265]);
        assert_eq!(r.gauss(0.0, 1.0), -1.396_578_104_701_149_8);
        assert_eq!(r.gauss(0.0, 1.0), 1.126_543_496_049_698_7);
        let c: Vec<usize> = (0..10).map(|_| *r.choice(&range7)).collect();
        assert_eq!(c, [6, 6, 2, 3, 2, 4, 1, 4, 1, 2]);
        assert_eq!([*r.choice(&[0]), *r.choice(&[0])], [0, 0]);
        assert_eq!(r.getrandbits(32), 2_655_874_620);
    }
}
