//! Optimizers, learning-rate schedules and gradient clipping for `learn`
//! blocks, with PyTorch's update rules (`torch.optim.SGD`, `Adam`, `AdamW`,
//! `torch.nn.utils.clip_grad_norm_`), in f32 as PyTorch computes them.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// SGD with momentum (`dampening`, `nesterov` as in PyTorch).
    Sgd {
        momentum: f32,
        dampening: f32,
        nesterov: bool,
    },
    /// Adam: weight decay is an L2 term added to the gradient.
    Adam,
    /// AdamW: weight decay shrinks the weights directly (decoupled).
    AdamW,
}

#[derive(Clone, Debug)]
pub struct Optimizer {
    pub kind: Kind,
    pub lr: f32,
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
    /// Per parameter: momentum buffer (SGD) or first moment (Adam).
    m: Vec<Vec<f32>>,
    /// Per parameter: second moment (Adam).
    v: Vec<Vec<f32>>,
    /// Steps taken.
    t: u64,
}

impl Optimizer {
    pub fn new(kind: Kind, lr: f32) -> Optimizer {
        Optimizer {
            kind,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: if kind == Kind::AdamW { 0.01 } else { 0.0 },
            m: Vec::new(),
            v: Vec::new(),
            t: 0,
        }
    }

    /// One update of every parameter with learning rate `lr` (the
    /// schedule's value for this step).
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32) {
        if self.m.len() != params.len() {
            self.m = params.iter().map(|p| vec![0.0; p.len()]).collect();
            self.v = params.iter().map(|p| vec![0.0; p.len()]).collect();
        }
        self.t += 1;
        let wd = self.weight_decay;
        match self.kind {
            Kind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                for ((p, g), buf) in params.iter_mut().zip(grads).zip(&mut self.m) {
                    for i in 0..p.len() {
                        let mut d = g[i] + wd * p[i];
                        if momentum != 0.0 {
                            buf[i] = if self.t == 1 {
                                d
                            } else {
                                momentum * buf[i] + (1.0 - dampening) * d
                            };
                            d = if nesterov {
                                d + momentum * buf[i]
                            } else {
                                buf[i]
                            };
                        }
                        p[i] -= lr * d;
                    }
                }
            }
            Kind::Adam | Kind::AdamW => {
                let (b1, b2) = self.betas;
                let t = self.t as i32;
                let bc1 = 1.0 - b1.powi(t);
                let bc2 = 1.0 - b2.powi(t);
                let decoupled = self.kind == Kind::AdamW;
                for (((p, g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                {
                    for i in 0..p.len() {
                        let mut d = g[i];
                        if decoupled {
                            p[i] *= 1.0 - lr * wd;
                        } else {
                            d += wd * p[i];
                        }
                        m[i] = b1 * m[i] + (1.0 - b1) * d;
                        v[i] = b2 * v[i] + (1.0 - b2) * d * d;
                        let denom = (v[i] / bc2).sqrt() + self.eps;
                        p[i] -= lr / bc1 * m[i] / denom;
                    }
                }
            }
        }
    }
}

/// Scales the gradients so that their joint L2 norm is at most `max_norm`
/// (as `clip_grad_norm_`: by `max_norm / (norm + 1e-6)` when that is
/// below 1); returns the norm before clipping.
pub fn clip_norm(grads: &mut [Vec<f32>], max_norm: f32) -> f32 {
    let total: f32 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| x * x)
        .sum::<f32>()
        .sqrt();
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        grads
            .iter_mut()
            .flat_map(|g| g.iter_mut())
            .for_each(|x| *x *= coef);
    }
    total
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warm-up over `warmup` steps, then a cosine decay from the
    /// base rate to `min_lr` at the last step.
    Cosine {
        warmup: u64,
        min_lr: f32,
    },
    /// Linear warm-up over `steps` steps, then constant.
    Warmup {
        steps: u64,
    },
}

impl Schedule {
    /// The learning rate of step `t` (0-based) of `total`.
    pub fn lr(&self, base: f32, t: u64, total: u64) -> f32 {
        let warm = |w: u64| {
            if w > 0 && t < w {
                Some(base * (t + 1) as f32 / w as f32)
            } else {
                None
            }
        };
        match *self {
            Schedule::Constant => base,
            Schedule::Warmup { steps } => warm(steps).unwrap_or(base),
            Schedule::Cosine { warmup, min_lr } => {
                if let Some(lr) = warm(warmup) {
                    return lr;
                }
                let span = total.saturating_sub(warmup).max(1) as f32;
                let p = ((t - warmup.min(t)) as f32 / span).min(1.0);
                min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f32::consts::PI * p).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = Schedule::Cosine {
            warmup: 2,
            min_lr: 0.0,
        };
        assert!((c.lr(1.0, 0, 12) - 0.5).abs() < 1e-6);
        assert!((c.lr(1.0, 1, 12) - 1.0).abs() < 1e-6);
        assert!((c.lr(1.0, 2, 12) - 1.0).abs() < 1e-6);
        assert!((c.lr(1.0, 7, 12) - 0.5).abs() < 1e-6);
        assert!(c.lr(1.0, 11, 12) < 0.03);
        let w = Schedule::Warmup { steps: 4 };
        assert!((w.lr(2.0, 0, 10) - 0.5).abs() < 1e-6);
        assert!((w.lr(2.0, 9, 10) - 2.0).abs() < 1e-6);
        assert_eq!(Schedule::Constant.lr(0.3, 5, 10), 0.3);
    }

    #[test]
    fn clipping_scales_to_the_norm() {
        let mut g = vec![vec![3.0, 0.0], vec![4.0]];
        let n = clip_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
        let mut small = vec![vec![0.1]];
        clip_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.1);
    }
}
