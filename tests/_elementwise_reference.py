"""Plain single-tensor renditions of the elementwise algorithms' update rules, for the tests (a helper
module, not a test file: it holds no tests).

Each is a class with ``step()`` over a list of parameters, written from the papers' algorithm boxes (Lion:
Chen et al. 2023; Signum: Bernstein et al. 2018; ADOPT: Taniguchi et al. 2024; AdEMAMix: Pagliardini et al.
2024; MARS: Yuan et al. 2024; schedule-free AdamW: Defazio et al. 2024) with no foreach tricks:
tests/test_optim_elementwise.py compares the package's optimizers to these (float64, rtol 1e-6).
"""

from __future__ import annotations

import math

import torch


class _Base:
    def __init__(self, params, **hp):
        self.params = list(params)
        self.hp = hp
        self.state = {id(p): {} for p in self.params}


class RefLion(_Base):
    @torch.no_grad()
    def step(self):
        lr, wd, (b1, b2) = self.hp["lr"], self.hp["weight_decay"], self.hp["betas"]
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            m = st.setdefault("m", torch.zeros_like(p))
            g = p.grad
            p.mul_(1 - lr * wd)
            p.sub_(lr * torch.sign(b1 * m + (1 - b1) * g))
            m.copy_(b2 * m + (1 - b2) * g)


class RefSignum(_Base):
    @torch.no_grad()
    def step(self):
        lr, wd, mu, nest = self.hp["lr"], self.hp["weight_decay"], self.hp["momentum"], self.hp["nesterov"]
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            buf = st.setdefault("buf", torch.zeros_like(p))
            g = p.grad
            buf.copy_(mu * buf + g)
            d = g + mu * buf if nest else buf
            p.mul_(1 - lr * wd)
            p.sub_(lr * torch.sign(d))


class RefADOPT(_Base):
    """iShohei220/adopt, decoupled, clip_lambda = step**0.25 read before the increment."""

    @torch.no_grad()
    def step(self):
        lr, wd, eps, (b1, b2) = self.hp["lr"], self.hp["weight_decay"], self.hp["eps"], self.hp["betas"]
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            if not st:
                st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            g, m, v, step = p.grad, st["m"], st["v"], st["step"]
            if step == 0:
                v.copy_(g * g)
                st["step"] = 1
                continue
            p.mul_(1 - lr * wd)
            n = g / torch.clamp(v.sqrt(), min=eps)
            clip = step**0.25
            n = n.clamp(-clip, clip)
            m.copy_(m + (1 - b1) * (n - m))
            p.sub_(lr * m)
            v.copy_(b2 * v + (1 - b2) * g * g)
            st["step"] = step + 1


class RefAdEMAMix(_Base):
    """apple/ml-ademamix."""

    @torch.no_grad()
    def step(self):
        h = self.hp
        lr, wd, eps, (b1, b2), b3f, af = h["lr"], h["weight_decay"], h["eps"], h["betas"], h["beta3"], h["alpha"]
        ta, tb = h.get("alpha_warmup"), h.get("beta3_warmup")
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            if not st:
                st.update(step=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), v=torch.zeros_like(p))
            st["step"] += 1
            t = st["step"]
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            alpha = af * min(1.0, t / ta) if ta else af
            if tb and t < tb:
                f = lambda b: math.log(0.5) / math.log(b + 1e-8) - 1  # noqa: E731
                s = t / tb
                b3 = 0.5 ** (1 / ((1 - s) * f(b1) + s * f(b3f) + 1))
            else:
                b3 = b3f
            g = p.grad
            st["m1"].mul_(b1).add_(g, alpha=1 - b1)
            st["m2"].mul_(b3).add_(g, alpha=1 - b3)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(eps)
            update = (st["m1"] / bc1 + alpha * st["m2"]) / denom + wd * p
            p.sub_(lr * update)


class RefMARS(_Base):
    """AGI-Arena/MARS mars-adamw with last_grad copied; 1-D → AdamW (adamw_lr, adamw_betas)."""

    @torch.no_grad()
    def step(self):
        h = self.hp
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            if not st:
                st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), last=torch.zeros_like(p))
            st["step"] += 1
            t, g = st["step"], p.grad
            if p.ndim >= 2:
                lr, (b1, b2) = h["lr"], h["betas"]
                c = g + h["gamma"] * (b1 / (1 - b1)) * (g - st["last"])
                nrm = torch.linalg.vector_norm(c)
                if nrm > 1:
                    c = c / nrm
                st["last"] = g.clone()
            else:
                lr, (b1, b2) = h["adamw_lr"], h["adamw_betas"]
                c = g
            st["m"].mul_(b1).add_(c, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(c, c, value=1 - b2)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            p.sub_(lr * (h["weight_decay"] * p + (st["m"] / bc1) / ((st["v"] / bc2).sqrt() + h["eps"])))


class RefSFAdamW(_Base):
    """Schedule-free AdamW with explicit x, y, z (the paper's form), the parameter holding y."""

    def __init__(self, params, **hp):
        super().__init__(params, **hp)
        self.k, self.lr_max, self.wsum = 0, -1.0, 0.0

    @torch.no_grad()
    def step(self):
        h = self.hp
        b1, b2 = h["betas"]
        k = self.k
        lr = h["lr"] * ((k + 1) / h["warmup_steps"] if k < h["warmup_steps"] else 1.0)
        self.lr_max = max(self.lr_max, lr)
        w = (k + 1) ** h.get("r", 0.0) * self.lr_max ** h.get("weight_lr_power", 2.0)
        self.wsum += w
        c = w / self.wsum
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[id(p)]
            if not st:
                st.update(z=p.clone(), x=p.clone(), v=torch.zeros_like(p))
            g, y = p.grad, p
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            u = g / ((st["v"] / (1 - b2 ** (k + 1))).sqrt() + h["eps"]) + h["weight_decay"] * y
            st["z"].sub_(lr * u)
            st["x"].mul_(1 - c).add_(c * st["z"])
            p.copy_((1 - b1) * st["z"] + b1 * st["x"])
        self.k += 1

    def x_of(self, p):
        return self.state[id(p)]["x"]
