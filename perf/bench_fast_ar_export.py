"""Fast-AR export design benchmark: whole residual loop in one graph (sampling inside) vs one graph
per codebook step with the KV cache as explicit inputs/outputs (sampling in torch between steps),
next to the torch fast AR; checks that all three give identical codes.

    python perf/bench_fast_ar_export.py CHECKPOINT_DIR SCRATCH_DIR [THREADS]

Result behind the choice in fish_s2/export/onnx_export.py: perf/results/fast_ar_export_cpu.md.
"""
import statistics, sys, time, warnings
import onnxruntime as ort, torch
from torch import nn
from fish_s2.checkpoint import load_config, load_dual_ar
from fish_s2.dual_ar import sample_codes
from fish_s2.request import SamplingParams
from fish_s2.sampling import BatchSampling, logits_to_probs, race, uniform_noise
warnings.filterwarnings("ignore"); torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
ck, out = sys.argv[1], sys.argv[2]
cfg, _ = load_config(ck)
model = load_dual_ar(ck, cfg)
fast, n_cb, V = model.fast, cfg.num_codebooks, cfg.codebook_size

class Cat:
    def __init__(self, k=None, v=None): self.k, self.v = k, v
    def write(self, slots, input_pos, k, v, kv_len):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v

class GivenNoise(BatchSampling):
    def __init__(self, t, p, k, noise):
        super().__init__(t, p, k, torch.zeros_like(k)); self.noise, self.i = noise, 0
    def sample(self, logits, ids, draw, temperature=None, top_p=None, u=None):
        u = self.noise[:, self.i]; self.i += 1
        return race(logits_to_probs(logits, self.temperature, self.top_p, self.top_k), u)

class Loop(nn.Module):
    def __init__(self): super().__init__(); self.fast, self.cfg = fast, cfg
    def forward(self, hidden, main, temperature, top_p, top_k, noise):
        return sample_codes(self, hidden, main, GivenNoise(temperature, top_p, top_k, noise), torch.zeros_like(main),
                            [Cat() for _ in self.fast.layers])

class Step(nn.Module):
    def __init__(self, pos): super().__init__(); self.pos = pos; self.fast = fast
    def forward(self, x, *kv):
        caches = [Cat(kv[2*i], kv[2*i+1]) if self.pos else Cat() for i in range(len(self.fast.layers))]
        inp = self.fast.project_in(x) if self.pos == 0 else self.fast.embeddings(x)
        logits = self.fast.step(inp, self.pos, caches, logits=self.pos > 0)
        outs = [t for c in caches for t in (c.k, c.v)]
        return (logits, *outs) if self.pos else tuple(outs)

B0 = 2
h = torch.randn(B0, cfg.slow.dim); main = torch.full((B0,), cfg.semantic_begin_id + 5)
f32 = lambda *s: torch.rand(*s)
ax = {0: "b"}
torch.onnx.export(Loop(), (h, main, f32(B0), f32(B0), torch.ones(B0, dtype=torch.long), f32(B0, n_cb - 1, V)), f"{out}/loop.onnx",
                  input_names=["hidden", "main", "temperature", "top_p", "top_k", "noise"], output_names=["codes"],
                  dynamic_axes={n: ax for n in ["hidden", "main", "temperature", "top_p", "top_k", "noise", "codes"]}, opset_version=17, dynamo=False)
L, H, D = cfg.fast.n_layer, cfg.fast.n_kv_head, cfg.fast.head_dim
for pos in range(n_cb):
    x = h if pos == 0 else main
    kv = [torch.randn(B0, H, pos, D) for _ in range(2 * L)] if pos else []
    names = [f"kv{i}" for i in range(2 * L)]
    outn = (["logits"] if pos else []) + [f"o{i}" for i in range(2 * L)]
    torch.onnx.export(Step(pos), (x, *kv), f"{out}/step{pos}.onnx", input_names=["x"] + (names if pos else []), output_names=outn,
                      dynamic_axes={n: ax for n in ["x"] + (names if pos else []) + outn}, opset_version=17, dynamo=False)
so = ort.SessionOptions(); so.intra_op_num_threads = torch.get_num_threads()
loop = ort.InferenceSession(f"{out}/loop.onnx", so, providers=["CPUExecutionProvider"])
steps = [ort.InferenceSession(f"{out}/step{p}.onnx", so, providers=["CPUExecutionProvider"]) for p in range(n_cb)]
ids = torch.arange(V)

def run_loop(hidden, main, s, draw0):
    draws = draw0[:, None] + 1 + torch.arange(1, n_cb)
    u = torch.stack([uniform_noise(s.key, draws[:, j], ids) for j in range(n_cb - 1)], 1)
    return torch.from_numpy(loop.run(None, {"hidden": hidden.numpy(), "main": main.numpy(), "temperature": s.temperature.numpy(),
                                            "top_p": s.top_p.numpy(), "top_k": s.top_k.numpy(), "noise": u.numpy()})[0])

def run_steps(hidden, main, s, draw0):
    code = (main - cfg.semantic_begin_id).clamp(0, V - 1); codes = [code]
    kv = steps[0].run(None, {"x": hidden.numpy()})
    for p in range(1, n_cb):
        o = steps[p].run(None, {"x": code.numpy(), **{f"kv{i}": t for i, t in enumerate(kv)}})
        logits, kv = torch.from_numpy(o[0]), o[1:]
        code = s.sample(logits, ids, draw0 + 1 + p); codes.append(code)
    return torch.stack(codes, 1)

def run_torch(hidden, main, s, draw0):
    return sample_codes(model, hidden, main, s, draw0, fast_cache)

def bench(fn, *a, n=30):
    for _ in range(3): fn(*a)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(*a); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

print(f"{ck}: slow dim {cfg.slow.dim}, fast dim {cfg.fast.dim} x {cfg.fast.n_layer} layers, threads {torch.get_num_threads()}")
with torch.no_grad():
    for B in (1, 8, 32):
        fast_cache = model.fast.new_cache(B)
        hidden = torch.randn(B, cfg.slow.dim); main = torch.randint(cfg.semantic_begin_id, cfg.semantic_end_id, (B,))
        s = BatchSampling.of([SamplingParams(seed=i) for i in range(B)]); draw0 = torch.arange(B) * 11
        a, b, c = run_torch(hidden, main, s, draw0), run_loop(hidden, main, s, draw0), run_steps(hidden, main, s, draw0)
        print(f"B={B:3d} identical loop={bool((a == b).all())} steps={bool((a == c).all())} | ms/frame torch {bench(run_torch, hidden, main, s, draw0):7.2f}"
              f"  ort-loop {bench(run_loop, hidden, main, s, draw0):7.2f}  ort-steps {bench(run_steps, hidden, main, s, draw0):7.2f}")
