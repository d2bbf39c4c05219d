#!/usr/bin/env python3
""" Speed and memory benchmark: a MASA ViT against its dense twin (same options, `sharing='dense'`).

For every (model, batch size, mode) case the two models run interleaved, run by run (A-B, then B-A on the next
repeat, so that a drift of the machine's speed hits both alike), after warm-up. Each timing is one run of a fixed
number of iterations (chosen during warm-up so that a run lasts at least `--min-run-s`), reported as the time per
iteration: median, inter-quartile range and min/max over the repeats, images/s, and the ratio MASA / dense of the
medians (plus the median of the per-repeat paired ratios, which cancels slow drifts of a shared machine).
Training cases on CPU run each arm in its own process by default (`--isolate`): glibc's malloc returns memory to the
kernel and page-faults it back in at a rate that depends on everything else the process allocated, so two models
sharing one heap change each other's step time by several percent; in separate processes each has its own heap, as a
user's training run has. Minor page faults per step are reported for every arm; `--malloc keep` runs the isolated
processes with glibc settings under which a warmed-up step faults nothing in (the compute-only comparison).

    train   one optimizer step: zero_grad, forward, cross-entropy, backward, AdamW step (broken into fwd/bwd/opt)
    eval    one forward in eval mode under torch.no_grad() (the MASA eval cache is on: same arithmetic as dense)

Also, unless switched off:

    --memory       peak memory of N training steps, in a fresh subprocess per (model, batch, twin): peak RSS (VmHWM, ru_maxrss) on
                   CPU, torch.cuda.max_memory_allocated on CUDA
    --conversions  the conversions users wait for: to_dense, coefficient folding, the first eval call after a
                   training step (cache build), Matrix PCA (convert_state_dict) of masa_vit_base
    --profile      torch.profiler: where MASA's extra training time goes, op by op against dense; the cost of an
                   eval cache hit; the weight reconstruction alone (forward + backward of all blocks)

On CUDA everything runs under bf16 autocast. `--compile on|both` adds torch.compile'd twins (compile time reported
apart from the steady state).

Usage:
    python benchmarks/bench_speed.py                              # the full grid of issue 6 (hours on a small CPU)
    python benchmarks/bench_speed.py --preset cpu-quick \\
        --out output/bench_speed/cpu.json --markdown docs/speed_results_cpu.md        # ~15 min on 2 CPU cores
    python benchmarks/bench_speed.py --models masa_vit_small --batch-sizes 16 --modes train --repeats 9
    python benchmarks/bench_speed.py --device cuda --preset full --compile both       # one GPU, bf16 AMP

Presets (explicit --models / --batch-sizes / --modes replace the preset's grid by their product):
    full        masa_vit_tiny/small/base (224 px) and the three 32 px shapes, batch 1/16/64, train and eval
    cpu-quick   what decides the targets on a small CPU: masa_vit_small train b16/b64, eval b1/16/64;
                masa_vit_tiny train b16, eval b1/16; the 32 px shapes train b64, eval b1/b64; memory for the
                training cases; conversions; profile
"""
import argparse
import copy
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import masa_vit  # noqa: E402  (registers the masa_vit_* models)
from masa_vit.attention import AtomLinear  # noqa: E402
from masa_vit.dictionary import AtomDictionary  # noqa: E402

# weight compositions, counted to show that timed eval runs hit the cache (a wrapper, not a change of the model)
_compose_calls = [0]
_compose = AtomLinear._compose


def _counted_compose(self, *args, **kwargs):
    if not torch.compiler.is_compiling():
        _compose_calls[0] += 1
    return _compose(self, *args, **kwargs)


AtomLinear._compose = _counted_compose

_logger = logging.getLogger('bench_speed')

MODELS_224 = ('masa_vit_tiny', 'masa_vit_small', 'masa_vit_base')
MODELS_32 = ('masa_vit_nano_patch4_32', 'masa_vit_micro_patch4_32', 'masa_vit_microd_patch4_32')

# a preset is a list of grids; each grid is the product of its models, batch sizes and modes
PRESETS = {
    'full': dict(
        grids=[dict(models=MODELS_224 + MODELS_32, batch_sizes=(1, 16, 64), modes=('train', 'eval'))],
        memory=[dict(models=MODELS_224 + MODELS_32, batch_sizes=(1, 16, 64))],
        repeats=7, eval_repeats=11, warmup=2,
    ),
    'cpu-quick': dict(
        grids=[
            dict(models=('masa_vit_small',), batch_sizes=(16, 64), modes=('train',)),
            dict(models=('masa_vit_small',), batch_sizes=(1, 16, 64), modes=('eval',)),
            dict(models=('masa_vit_tiny',), batch_sizes=(16,), modes=('train',)),
            dict(models=('masa_vit_tiny',), batch_sizes=(1, 16), modes=('eval',)),
            dict(models=MODELS_32, batch_sizes=(64,), modes=('train',)),
            dict(models=MODELS_32, batch_sizes=(1, 64), modes=('eval',)),
        ],
        memory=[
            dict(models=('masa_vit_small',), batch_sizes=(16, 64)),
            dict(models=('masa_vit_tiny',), batch_sizes=(16,)),
            dict(models=MODELS_32, batch_sizes=(64,)),
        ],
        repeats=7, eval_repeats=15, warmup=1,
    ),
}

# issue 6 targets (MASA / dense, same run)
TARGETS = dict(train=1.03, eval=1.01, memory=1.00, conversion_s=1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='full', choices=sorted(PRESETS), help='case grid and defaults (see above)')
    p.add_argument('--models', nargs='+', default=None, help='masa_vit_* names (replaces the preset grid)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='batch sizes (replaces the preset grid)')
    p.add_argument('--modes', default=None, help="comma list of 'train', 'eval' (replaces the preset grid)")
    p.add_argument('--img-size', type=int, default=None, help="override the models' input size (default: theirs)")
    p.add_argument('--model-kwargs', default='{}', help='JSON kwargs for both twins, e.g. \'{"coef": "mlp"}\'')
    p.add_argument('--repeats', type=int, default=None, help='timed runs per model (default: the preset\'s)')
    p.add_argument('--eval-repeats', type=int, default=None,
                   help='timed runs per model for eval cases (cheap and noise-sensitive; default: the preset\'s)')
    p.add_argument('--warmup', type=int, default=None, help='untimed warm-up runs per model (default: the preset\'s)')
    p.add_argument('--min-run-s', type=float, default=0.5, help='each timed run repeats the step to last this long')
    p.add_argument('--control', action=argparse.BooleanOptionalAction, default=True,
                   help='eval cases also time a third arm, to_dense(MASA model): same arithmetic as the cached MASA eval')
    p.add_argument('--per-block-arm', action='store_true',
                   help='train cases also time a copy of the MASA model that composes its weights block by block '
                        '(AtomDictionary.batched_compose = False): the gain of the batched composition, same run')
    p.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=None,
                   help="time each arm in its own process (its own heap, as a user's training run has; the parent "
                        "alternates them run by run); default: on for train cases on CPU, where glibc's page "
                        "faults depend on what else the process allocated")
    p.add_argument('--malloc', default='default', choices=('default', 'keep'),
                   help="glibc malloc of the isolated timing processes: 'default', or 'keep' (no mmap'd buffers, "
                        "no trimming: after warm-up no step page-faults fresh memory in)")
    p.add_argument('--aa-arm', action='store_true',
                   help='train cases also time the dense twin a second time (A/A: two identical models; their ratio '
                        'is what the machine reports when there is no difference)')
    p.add_argument('--compile', default='off', choices=('off', 'on', 'both'), help='torch.compile the twins')
    p.add_argument('--grad-checkpointing', action='store_true', help="timm's set_grad_checkpointing for train")
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (bf16 autocast on CUDA)")
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: all CPUs)')
    p.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate of the timed steps')
    p.add_argument('--speed', action=argparse.BooleanOptionalAction, default=True, help='the timed cases')
    p.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True, help='peak memory subprocesses')
    p.add_argument('--memory-steps', type=int, default=3, help='training steps per memory subprocess')
    p.add_argument('--memory-allocator', default='both', choices=('default', 'mmap', 'both'),
                   help="CPU: glibc's default malloc, and/or a fixed 64 KiB mmap threshold (peak RSS then follows the "
                        "peak of live tensors instead of heap fragmentation)")
    p.add_argument('--conversions', action=argparse.BooleanOptionalAction, default=True, help='time conversions')
    p.add_argument('--conversion-model', default='masa_vit_base', help='model for the conversion timings')
    p.add_argument('--profile', action=argparse.BooleanOptionalAction, default=True, help='profiler breakdown')
    p.add_argument('--profile-model', default='masa_vit_small', help='model for the profile')
    p.add_argument('--profile-batch', type=int, default=16, help='batch size for the profile')
    p.add_argument('--out', default='output/bench_speed/results.json', help='JSON results file')
    p.add_argument('--markdown', default=None, help='also write the markdown tables here (in place between the '
                   'section markers when the file has them, see --markdown-section)')
    p.add_argument('--markdown-section', default='results',
                   help='name in the markers <!-- bench_speed:NAME:begin/end --> of the file given to --markdown')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one worker
    p.add_argument('--timing-worker', default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one arm
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return torch.autocast('cpu', enabled=False)


def build_model(name: str, sharing: str, model_kwargs: Dict[str, Any], img_size: Optional[int], seed: int,
                device: torch.device) -> nn.Module:
    """One twin: the MASA model ('masa') or the dense twin ('dense') built with the same options and seed."""
    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs['img_size'] = img_size
    if sharing == 'dense':
        kwargs['sharing'] = 'dense'
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).to(device)


def make_batch(model: nn.Module, batch_size: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    x = torch.randn(batch_size, 3, *size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g).to(device)
    return x, y


class Runner:
    """One twin, ready to time: model, optimizer, batch, and a step function for the mode."""

    def __init__(self, name, sharing, mode, batch_size, args, device, compiled=False, model=None):
        self.sharing = sharing
        self.model = model if model is not None else build_model(
            name, sharing, args.model_kwargs, args.img_size, args.seed, device)
        self.x, self.y = make_batch(self.model, batch_size, device, args.seed)
        self.device = device
        self.mode = mode
        if mode == 'train':
            self.model.train()
            if args.grad_checkpointing:
                self.model.set_grad_checkpointing(True)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.05)
        else:
            self.model.eval()
        self.fn = torch.compile(self.model) if compiled else self.model
        self.parts = {'fwd': [], 'bwd': [], 'opt': []}  # per-iteration split of the training step
        self.faults: List[float] = []  # minor page faults per step, one value per timed run

    def first_step(self) -> float:
        """The first call (compilation when compiled), timed."""
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0

    def params(self) -> Dict[str, int]:
        return masa_vit.count_params(self.model)

    def close(self) -> None:
        pass

    def step(self) -> None:
        if self.mode == 'train':
            # the fwd / bwd / opt split needs no synchronization on CPU; on CUDA it would serialize kernel launches
            # with execution (hiding nothing of MASA's extra small kernels), so there only the whole step is timed
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            with _autocast(self.device):
                loss = F.cross_entropy(self.fn(self.x), self.y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            self.opt.step()
            _sync(self.device)
            t3 = time.perf_counter()
            self._last_parts = (t1 - t0, t2 - t1, t3 - t2)
        else:
            with torch.no_grad(), _autocast(self.device):
                self.fn(self.x)
            _sync(self.device)

    def run(self, iters: int) -> Tuple[float, float]:
        """Time `iters` steps; returns (wall-clock, process CPU) seconds per step."""
        _sync(self.device)
        sums = [0.0, 0.0, 0.0]
        f0 = _minor_faults()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(iters):
            self.step()
            if self.mode == 'train':
                sums = [a + b for a, b in zip(sums, self._last_parts)]
        dt, dc = (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters
        self.faults.append((_minor_faults() - f0) / iters)
        if self.mode == 'train':
            for k, v in zip(('fwd', 'bwd', 'opt'), sums):
                self.parts[k].append(v / iters)
        return dt, dc


def _minor_faults() -> int:
    """Minor page faults of this process so far: first touches of memory the allocator got fresh from the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _worker_spec(name: str, batch_size: int, args, device: torch.device, **extra) -> Dict[str, Any]:
    """What a worker process (timing or peak memory) needs to rebuild a case: JSON-able, passed on its command line."""
    return dict(model=name, batch_size=batch_size, device=str(device), threads=args.threads,
                model_kwargs=args.model_kwargs, img_size=args.img_size, seed=args.seed, lr=args.lr,
                grad_checkpointing=bool(args.grad_checkpointing), **extra)


def _worker_args(spec: Dict[str, Any]) -> argparse.Namespace:
    """Sets a worker process's torch threads and returns the options `Runner` and `build_arm` read."""
    torch.set_num_threads(spec['threads'])
    return argparse.Namespace(model_kwargs=spec['model_kwargs'], img_size=spec['img_size'], seed=spec['seed'],
                              lr=spec['lr'], grad_checkpointing=spec['grad_checkpointing'])


def build_arm(name: str, arm: str, args, device: torch.device) -> nn.Module:
    """The model of one arm, built from the seed alone (a timing worker process must rebuild it identically).

    masa: the MASA model; dense: its dense twin; control: `to_dense` of the MASA model (MASA's own weights in plain
    nn.Linear); dense_copy: the dense twin again (A/A); masa_per_block: the MASA model composing block by block.
    """
    if arm in ('dense', 'dense_copy'):
        return build_model(name, 'dense', args.model_kwargs, args.img_size, args.seed, device)
    model = build_model(name, 'masa', args.model_kwargs, args.img_size, args.seed, device)
    if arm == 'control':
        return masa_vit.to_dense(model)
    if arm == 'masa_per_block':
        for d in model.modules():
            if isinstance(d, AtomDictionary):
                d.batched_compose = False
    return model


# glibc returns freed memory to the kernel (large buffers are their own mappings; the heap top is trimmed), and a
# training step then page-faults its activations in again; how much depends on the history of allocations, so two
# models differ by it. 'keep': no mmap'd buffers, no trimming: after warm-up a step touches no fresh memory (as with
# a caching allocator such as jemalloc / tcmalloc, or CUDA's).
# 'mmap' (peak-memory workers): glibc keeps freed chunks below its (adaptive, up to 32 MiB) mmap threshold in its
# heap, so RSS also counts fragmentation that depends on the order of allocations; with a fixed small threshold every
# tensor buffer is its own mapping, returned on free, and the peak RSS follows the peak of live tensors.
_MALLOC_ENV = {
    'default': {},
    'mmap': {'MALLOC_MMAP_THRESHOLD_': '65536', 'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'},
    'keep': {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2 ** 46), 'MALLOC_TOP_PAD_': '0',
             'GLIBC_TUNABLES': f'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2 ** 46}'},
}
_REPLY = '@bench_speed@ '  # prefix of a timing worker's replies on stdout (anything else printed there is skipped)


class WorkerArm:
    """One arm in its own process (`--isolate`): the same interface as `Runner`, driven over a pipe.

    Each process has its own heap, as a user's training run has, so the allocation history of one model does not
    change the page faults of the other; the parent still alternates the arms run by run.
    """

    def __init__(self, name, arm, mode, batch_size, args, device, compiled=False):
        spec = _worker_spec(name, batch_size, args, device, arm=arm, mode=mode, compiled=compiled)
        env = dict(os.environ, **_MALLOC_ENV[args.malloc])
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--timing-worker', json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.mode = mode
        self.parts = {'fwd': [], 'bwd': [], 'opt': []}
        self.faults: List[float] = []
        self._params = self._call(cmd='params')['params']
        self.compose_calls = 0

    def _call(self, **msg) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(msg) + '\n')
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise RuntimeError(f'timing worker exited with status {self.proc.wait()} (its stderr is above)')

    def first_step(self) -> float:
        return self._call(cmd='first')['s']

    def params(self) -> Dict[str, int]:
        return self._params

    def run(self, iters: int) -> Tuple[float, float]:
        r = self._call(cmd='run', iters=iters)
        if self.mode == 'train' and r['parts']:
            for k, v in r['parts'].items():
                self.parts[k].append(v)
        self.faults.append(r['faults'])
        self.compose_calls += r['compose_calls']
        return r['wall'], r['cpu']

    def close(self) -> None:
        if self.proc.poll() is None:
            self._call(cmd='quit')
            self.proc.wait()


def timing_worker(spec: Dict[str, Any]) -> None:
    """Runs in its own process: build one arm, then answer the parent's commands (one JSON line each)."""
    args = _worker_args(spec)
    device = torch.device(spec['device'])
    r = Runner(spec['model'], spec['arm'], spec['mode'], spec['batch_size'], args, device, spec['compiled'],
               model=build_arm(spec['model'], spec['arm'], args, device))
    for line in sys.stdin:
        msg = json.loads(line)
        if msg['cmd'] == 'quit':
            out = {}
        elif msg['cmd'] == 'params':
            out = dict(params=r.params())
        elif msg['cmd'] == 'first':
            out = dict(s=r.first_step())
        else:
            calls = _compose_calls[0]
            n = len(r.parts['fwd'])
            wall, cpu = r.run(msg['iters'])
            out = dict(wall=wall, cpu=cpu, faults=r.faults[-1], compose_calls=_compose_calls[0] - calls,
                       parts={k: v[-1] for k, v in r.parts.items()} if len(r.parts['fwd']) > n else None)
        print(_REPLY + json.dumps(out), flush=True)
        if msg['cmd'] == 'quit':
            return


def summarize(times: Sequence[float]) -> Dict[str, float]:
    q = statistics.quantiles(times, n=4, method='inclusive') if len(times) > 1 else [times[0]] * 3
    return dict(median=statistics.median(times), q25=q[0], q75=q[2], min=min(times), max=max(times), n=len(times))


def _loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------------
# Timed cases
# ---------------------------------------------------------------------------------------------------------------

def time_case(name: str, mode: str, batch_size: int, args, device: torch.device, compiled: bool) -> Dict[str, Any]:
    """Interleaved timing of the MASA model and its dense twin for one (model, mode, batch) case."""
    load_before = _loadavg()
    arms = ['masa', 'dense']
    if mode == 'eval' and args.control:
        # control arm: the dense export of the MASA model (masa_vit.to_dense), i.e. MASA's own weights in plain
        # nn.Linear layers: the same arithmetic as MASA's cached eval by construction. MASA / control isolates the
        # cost of the mechanism (cache checks); control / dense shows what weight values and noise alone do.
        # A/A arm: the dense twin again (same weights, same class, fresh allocations). dense copy / dense is what this
        # machine reports for two identical models: the resolution of every ratio in this case.
        arms += ['control', 'dense_copy']
    if mode == 'train' and args.aa_arm:
        arms.append('dense_copy')  # A/A: the resolution of the training ratio on this machine
    if mode == 'train' and args.per_block_arm:
        arms.append('masa_per_block')  # the per-block composition (code before the batched one), same interleaving
    isolate = args.isolate if args.isolate is not None else (mode == 'train' and device.type == 'cpu')
    if args.malloc != 'default' and not isolate:
        raise SystemExit(f'--malloc {args.malloc} applies to isolated timing processes: add --isolate')
    if isolate:
        runners = {s: WorkerArm(name, s, mode, batch_size, args, device, compiled) for s in arms}
    else:
        runners = {s: Runner(name, s, mode, batch_size, args, device, compiled) for s in ('masa', 'dense')}
        for s in arms[2:]:
            model = (copy.deepcopy(runners['dense'].model) if s == 'dense_copy'
                     else build_arm(name, s, args, device))
            runners[s] = Runner(name, s, mode, batch_size, args, device, compiled, model=model)
    arms = tuple(runners)
    compile_s = {}
    # the first call (compilation when compiled), then warm-up; calibrate iterations per run on the dense twin
    for s in arms:
        compile_s[s] = runners[s].first_step()
    per_iter = []
    for _ in range(args.warmup):
        for s in arms:
            per_iter.append(runners[s].run(1)[0])
    iters = max(1, int(args.min_run_s / max(min(per_iter) if per_iter else compile_s['dense'], 1e-6) + 0.999))
    for r in runners.values():
        r.parts = {'fwd': [], 'bwd': [], 'opt': []}
    times = {s: [] for s in arms}
    cpu_times = {s: [] for s in arms}
    paired, paired_cpu = [], []
    composes_before = _compose_calls[0]
    for rep in range(args.eval_repeats if mode == 'eval' else args.repeats):
        for s in (arms if rep % 2 == 0 else arms[::-1]):
            wall, cpu = runners[s].run(iters)
            times[s].append(wall)
            cpu_times[s].append(cpu)
        paired.append(times['masa'][-1] / times['dense'][-1])
        paired_cpu.append(cpu_times['masa'][-1] / cpu_times['dense'][-1])
    res = dict(
        model=name, mode=mode, batch_size=batch_size, compiled=compiled, device=str(device),
        grad_checkpointing=bool(args.grad_checkpointing and mode == 'train'),
        iters_per_run=iters, load_before=load_before, load_after=_loadavg(),
        # eval: weight compositions during the timed runs (0 = every cached call hit; uncompiled only, compiled
        # graphs compose inside the graph)
        compose_calls=(runners['masa'].compose_calls if isolate else _compose_calls[0] - composes_before),
        params={s: r.params() for s, r in runners.items()}, isolated=isolate, malloc=args.malloc if isolate else 'default',
    )
    for s in arms:
        st = summarize(times[s])
        st['times'] = times[s]
        st['cpu_times'] = cpu_times[s]
        st['cpu_median'] = statistics.median(cpu_times[s])
        st['images_per_s'] = batch_size / st['median']
        st['faults_per_step'] = statistics.median(runners[s].faults)
        if mode == 'train' and device.type == 'cpu':
            st['parts'] = {k: statistics.median(v) for k, v in runners[s].parts.items()}
        if compiled:
            st['first_call_s'] = compile_s[s]
        res[s] = st
    res['ratio'] = res['masa']['median'] / res['dense']['median']
    ps = summarize(paired)
    res['paired_ratio'] = dict(median=ps['median'], q25=ps['q25'], q75=ps['q75'])
    # process CPU time: what the step cost the CPU, insensitive to time spent waiting for a core on a shared machine
    # (meaningful on CPU with --threads 1; with more threads it includes OpenMP spin-waiting)
    res['cpu_ratio'] = res['masa']['cpu_median'] / res['dense']['cpu_median']
    res['paired_cpu_ratio'] = statistics.median(paired_cpu)
    if 'control' in runners:
        res['control_ratio'] = res['control']['median'] / res['dense']['median']
        res['masa_over_control'] = res['masa']['median'] / res['control']['median']
        res['masa_over_control_paired'] = statistics.median(
            [a / b for a, b in zip(times['masa'], times['control'])])
    if 'masa_per_block' in runners:
        res['per_block_ratio'] = res['masa_per_block']['median'] / res['dense']['median']
        res['batched_over_per_block_paired'] = statistics.median(
            [a / b for a, b in zip(times['masa'], times['masa_per_block'])])
    if 'dense_copy' in runners:
        res['aa_ratio'] = res['dense_copy']['median'] / res['dense']['median']
        res['aa_paired'] = statistics.median([a / b for a, b in zip(times['dense_copy'], times['dense'])])
    target = TARGETS[mode]
    res['target'] = target
    res['met'] = res['ratio'] <= target
    for r in runners.values():
        r.close()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Peak memory: a fresh process per (model, batch, twin)
# ---------------------------------------------------------------------------------------------------------------

def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """The process's peak RSS: VmHWM where /proc has it, else ru_maxrss. ru_maxrss alone is wrong in a subprocess:
    Linux carries the forking parent's peak over exec, so a worker started by a large benchmark process would
    report the parent's peak."""
    hwm = _proc_status_mb('VmHWM')
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: writing 5 to /proc/self/clear_refs), so that the peak is
    measured from here and not the transient peak of importing torch."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def memory_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: build one twin, run `steps` training steps, report the peak."""
    args = _worker_args(spec)
    device = torch.device(spec['device'])
    out = dict(peak_reset=_reset_peak_rss())
    out['rss_start_mb'] = _proc_status_mb('VmRSS') if out['peak_reset'] else _peak_rss_mb()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    r = Runner(spec['model'], spec['sharing'], 'train', spec['batch_size'], args, device)
    out['rss_built_mb'] = _proc_status_mb('VmRSS')
    for _ in range(spec['steps']):
        r.step()
    _sync(device)
    out['rss_peak_mb'] = _peak_rss_mb()
    if device.type == 'cuda':
        out['cuda_max_allocated_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    out['params'] = sum(p.numel() for p in r.model.parameters())
    return out


def measure_memory(name: str, batch_size: int, args, device: torch.device, allocator: str = 'default'
                   ) -> Dict[str, Any]:
    res = dict(model=name, batch_size=batch_size, device=str(device), steps=args.memory_steps,
               grad_checkpointing=bool(args.grad_checkpointing), allocator=allocator)
    env = dict(os.environ, **_MALLOC_ENV[allocator])
    for s in ('dense', 'masa'):
        spec = _worker_spec(name, batch_size, args, device, sharing=s, steps=args.memory_steps)
        cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f'memory worker failed for {spec}:\n{proc.stderr[-3000:]}')
        res[s] = json.loads(proc.stdout.strip().splitlines()[-1])
    key = 'cuda_max_allocated_mb' if device.type == 'cuda' else 'rss_peak_mb'
    res['metric'] = key
    res['ratio'] = res['masa'][key] / res['dense'][key]
    if device.type != 'cuda':
        # what training adds on top of the interpreter + torch + timm (the same in both processes)
        above = {s: res[s]['rss_peak_mb'] - res[s]['rss_start_mb'] for s in ('masa', 'dense')}
        res['ratio_above_start'] = above['masa'] / above['dense'] if above['dense'] > 0 else float('nan')
    res['target'] = TARGETS['memory']
    res['met'] = res['ratio'] <= TARGETS['memory']
    return res


# ---------------------------------------------------------------------------------------------------------------
# Conversions users wait for
# ---------------------------------------------------------------------------------------------------------------

def _timeit(fn: Callable[[], Any], repeats: int, setup: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    times = []
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        times.append(time.perf_counter() - t0)
    st = summarize(times)
    st['times'] = times
    return st


def time_conversions(args, device: torch.device, repeats: int = 3) -> List[Dict[str, Any]]:
    from masa_vit.conversion import convert_state_dict, from_dense
    name = args.conversion_model
    out = []

    masa = build_model(name, 'masa', args.model_kwargs, args.img_size, args.seed, device).eval()
    st = _timeit(lambda: masa_vit.to_dense(masa), repeats)
    out.append(dict(what=f'to_dense({name})', **st, target_s=TARGETS['conversion_s']))

    mlp_kwargs = dict(args.model_kwargs, coef='mlp')
    st = _timeit(lambda m: m.fold_coefficients(), repeats,
                 setup=lambda: build_model(name, 'masa', mlp_kwargs, args.img_size, args.seed, device))
    out.append(dict(what=f"fold_coefficients({name}, coef='mlp')", **st, target_s=TARGETS['conversion_s']))

    dense = build_model(name, 'dense', args.model_kwargs, args.img_size, args.seed, device)
    dense_sd = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    st = _timeit(lambda: convert_state_dict(dense_sd, masa), repeats)
    out.append(dict(what=f'Matrix PCA: convert_state_dict(dense {name} state dict)', **st,
                    target_s=TARGETS['conversion_s']))
    st = _timeit(lambda: from_dense(dense, num_atoms=masa.masa_kwargs['num_atoms']), repeats)
    out.append(dict(what=f'from_dense(dense {name}, num_atoms={masa.masa_kwargs["num_atoms"]}) (builds the model '
                         f'too; data-free)', **st, target_s=None))

    # the first eval call after a training step pays for composing every block's weights once (the cache build)
    for s, m in (('masa', masa), ('dense', dense)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        x, y = make_batch(m, 1, device, args.seed)
        first, steady = [], []
        for _ in range(repeats):
            m.train()
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                F.cross_entropy(m(x), y).backward()
            opt.step()
            m.eval()
            for lst in (first, steady, steady):
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad(), _autocast(device):
                    m(x)
                _sync(device)
                lst.append(time.perf_counter() - t0)
        f, sd = statistics.median(first), statistics.median(steady)
        out.append(dict(what=f'first eval call after a training step ({s} {name}, batch 1)', median=f, min=min(first),
                        max=max(first), n=len(first), steady_median=sd, extra_s=f - sd,
                        target_s=None))
    for r in out:
        r['met'] = None if r.get('target_s') is None else r['median'] <= r['target_s']
    return out


# ---------------------------------------------------------------------------------------------------------------
# Profile: where does MASA's extra time go?
# ---------------------------------------------------------------------------------------------------------------

def profile_breakdown(args, device: torch.device, steps: int = 4) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function
    name, bs = args.profile_model, args.profile_batch
    res = dict(model=name, batch_size=bs, steps=steps, time='self device' if device.type == 'cuda' else 'self CPU')

    # label the weight composition (instrumentation of this process only; the library is untouched)
    orig_compose = AtomLinear._compose

    def labelled_compose(self, *args, **kwargs):
        with record_function('masa::compose'):
            return orig_compose(self, *args, **kwargs)

    AtomLinear._compose = labelled_compose
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])

    def self_ms(e):  # CPU: self CPU time; CUDA: self device (kernel) time, which is what bounds a GPU step
        return (e.self_device_time_total if device.type == 'cuda' else e.self_cpu_time_total) / 1e3

    try:
        runners = {s: Runner(name, s, 'train', bs, args, device) for s in ('dense', 'masa')}
        for _ in range(2):
            for r in runners.values():
                r.step()
        per_op = {s: {} for s in runners}
        labels = {s: {} for s in runners}
        # one profiler session per step, alternating the twins, so that a drift of the machine hits both alike
        for i in range(steps):
            for s in (('dense', 'masa') if i % 2 == 0 else ('masa', 'dense')):
                with profile(activities=acts) as prof:
                    runners[s].step()
                for e in prof.key_averages():
                    ms, n = per_op[s].get(e.key, (0.0, 0))
                    per_op[s][e.key] = (ms + self_ms(e) / steps, n + e.count)
                    if e.key in ('masa::compose', 'Optimizer.step#AdamW.step'):
                        labels[s][e.key] = labels[s].get(e.key, 0.0) + e.cpu_time_total / 1e3 / steps
        per_op = {s: {k: (ms, n // steps) for k, (ms, n) in ops.items()} for s, ops in per_op.items()}
        del runners
    finally:
        AtomLinear._compose = orig_compose

    # ops by MASA - dense self CPU time per step
    keys = set(per_op['dense']) | set(per_op['masa'])
    rows = []
    for k in keys:
        d_ms, d_n = per_op['dense'].get(k, (0.0, 0))
        m_ms, m_n = per_op['masa'].get(k, (0.0, 0))
        rows.append(dict(op=k, dense_ms=d_ms, masa_ms=m_ms, diff_ms=m_ms - d_ms, dense_calls=d_n, masa_calls=m_n))
    rows.sort(key=lambda r: -abs(r['diff_ms']))
    res['op_diff'] = rows[:18]
    res['total_self_ms'] = {s: sum(v[0] for v in per_op[s].values()) for s in per_op}
    res['compose_fwd_ms'] = labels['masa'].get('masa::compose', 0.0)
    res['adamw_ms'] = {s: labels[s].get('Optimizer.step#AdamW.step', 0.0) for s in labels}
    comp_bwd = ('BmmBackward0', 'CatBackward0', 'SqueezeBackward1', 'UnsqueezeBackward0', 'SelectBackward0',
                'SliceBackward0', 'ComposeBlockMajorBackward', 'SplitWithSizesBackward0')
    res['compose_bwd_nodes_ms'] = {
        s: sum(v[0] for k, v in per_op[s].items() if any(k.endswith(n) for n in comp_bwd)) for s in per_op}

    # the reconstruction alone: compose every block's weights, backward a random gradient into atoms/coefficients
    m = build_model(name, 'masa', args.model_kwargs, args.img_size, args.seed, device).train()
    layers = [mod for mod in m.modules() if isinstance(mod, AtomLinear)]
    grads = [torch.randn(l.out_features, l.in_features, device=device) for l in layers]

    def recon():
        ws = [l._compose(batched=True) for l in layers]
        torch.autograd.backward(ws, grads)
        m.zero_grad(set_to_none=True)
        _sync(device)

    recon()
    res['reconstruction_fwd_bwd_ms'] = _timeit(recon, 7)['median'] * 1e3
    with profile(activities=acts) as prof:
        recon()
    ops = sorted(prof.key_averages(), key=lambda e: -self_ms(e))
    res['reconstruction_ops'] = [dict(op=e.key, ms=self_ms(e), calls=e.count) for e in ops[:8]]
    res['num_atom_linears'] = len(layers)

    # the eval cache: cost of a hit (key check) per layer and per forward
    m.eval()
    with torch.no_grad():
        layers[0].composed_weight()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            layers[0].composed_weight()
        hit_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n // 10):
            layers[0]._compose()
        miss_us = (time.perf_counter() - t0) / (n // 10) * 1e6
    res['cache_hit_us_per_layer'] = hit_us
    res['cache_hit_us_per_forward'] = hit_us * len(layers)
    res['compose_us_per_layer'] = miss_us
    return res


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def machine_info(args) -> Dict[str, Any]:
    info = dict(
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
        masa_vit=getattr(masa_vit, '__version__', '?'), platform=platform.platform(),
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=args.device,
        date=datetime.datetime.now().isoformat(timespec='seconds'),
    )
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith('Model name:'):
                info['cpu_model'] = line.split(':', 1)[1].strip()
    except OSError:
        pass
    if args.device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    try:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
        info['git_commit'] = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip()
        info['model_code_dirty'] = bool(subprocess.run(
            ['git', 'status', '--porcelain', 'masa_vit'], cwd=root, capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return info


def _ms(s: float) -> str:
    return f'{s * 1e3:.1f}' if s < 10 else f'{s * 1e3:.0f}'


def _met(ok) -> str:
    return '' if ok is None else ('yes' if ok else '**no**')


def to_markdown(results: Dict[str, Any]) -> str:
    meta = results['meta']
    lines = [
        f"Machine: {meta.get('cpu_model', '?')}, {meta['cpu_count']} CPUs, torch {meta['torch']}, timm {meta['timm']}, "
        f"{meta['threads']} torch threads, device {meta['device']}" + (f" ({meta['gpu']})" if 'gpu' in meta else '')
        + f"; {meta['date']}, commit {meta.get('git_commit', '?')}"
        + (' (+ uncommitted model code)' if meta.get('model_code_dirty') else ''),
        '',
        f"Command: `{meta['command']}`",
        '',
    ]
    if results['speed']:
        lines += [
            'Time per step in ms: median [IQR] over the interleaved runs; ratio = MASA median / dense median '
            '(wall clock, what the targets are checked on); paired = median of the per-repeat ratios; CPU = the same '
            'two on process CPU time, which a busy shared machine disturbs less. Load = 1-min load average before / '
            'after the case.',
            '',
            '| model | mode | batch | compiled | dense ms | MASA ms | dense img/s | MASA img/s | ratio | paired | '
            'CPU ratio / paired | target | met | load |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in results['speed']:
            d, m = r['dense'], r['masa']
            lines.append(
                f"| {r['model']} | {r['mode']}{' +ckpt' if r['grad_checkpointing'] else ''} | {r['batch_size']} | "
                f"{'yes' if r['compiled'] else 'no'} | "
                f"{_ms(d['median'])} [{_ms(d['q25'])}-{_ms(d['q75'])}] | {_ms(m['median'])} [{_ms(m['q25'])}-"
                f"{_ms(m['q75'])}] | {d['images_per_s']:.1f} | {m['images_per_s']:.1f} | {r['ratio']:.3f} | "
                f"{r['paired_ratio']['median']:.3f} | {r['cpu_ratio']:.3f} / {r['paired_cpu_ratio']:.3f} | "
                f"<= {r['target']:.2f} | {_met(r['met'])} | "
                f"{r['load_before'][0] if r['load_before'] else '?'} / {r['load_after'][0] if r['load_after'] else '?'} |")
        ctrl = [r for r in results['speed'] if 'control_ratio' in r]
        if ctrl:
            lines += ['', 'Eval control arms: control = `to_dense(MASA model)`, MASA\'s own weights in plain nn.Linear '
                      'layers (the same arithmetic as the cached MASA eval); A/A = a deep copy of the dense twin timed '
                      'against the dense twin (identical models: what this machine reports as a difference when '
                      'there is none). MASA / control = the cost of the cache mechanism itself; compositions = '
                      'weights composed during the timed MASA runs (0: every call hit the cache).', '',
                      '| model | batch | A/A ratio / paired | control / dense | MASA / control | MASA / control paired '
                      '| compositions |',
                      '|---|---|---|---|---|---|---|']
            for r in ctrl:
                aa = f"{r['aa_ratio']:.3f} / {r['aa_paired']:.3f}" if 'aa_ratio' in r else '-'
                lines.append(f"| {r['model']} | {r['batch_size']} | {aa} | {r['control_ratio']:.3f} | "
                             f"{r['masa_over_control']:.3f} | {r['masa_over_control_paired']:.3f} | "
                             f"{r.get('compose_calls', '-')} |")
        pb = [r for r in results['speed'] if 'per_block_ratio' in r]
        if pb:
            lines += ['', 'Per-block arm (`--per-block-arm`): a copy of the MASA model that composes each block\'s '
                      'weights in its own forward (AtomDictionary.batched_compose = False), timed in the same '
                      'interleaving. batched / per-block paired < 1: the batched composition is faster.', '',
                      '| model | batch | MASA batched / dense | MASA per-block / dense | batched / per-block paired |',
                      '|---|---|---|---|---|']
            for r in pb:
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['ratio']:.3f} | {r['per_block_ratio']:.3f} | "
                             f"{r['batched_over_per_block_paired']:.3f} |")
        train = [r for r in results['speed'] if r['mode'] == 'train' and 'parts' in r['dense']]
        if train:
            lines += ['', 'Training step split (median ms per step: forward + loss / backward / AdamW step; minor '
                      'page faults per step, median: memory the allocator took fresh from the kernel; isolated: each '
                      'arm in its own process; malloc: glibc settings of those processes):', '',
                      '| model | batch | dense fwd | MASA fwd | dense bwd | MASA bwd | dense opt | MASA opt | '
                      'dense faults | MASA faults | isolated | malloc |',
                      '|---|---|---|---|---|---|---|---|---|---|---|---|']
            for r in train:
                dp, mp = r['dense']['parts'], r['masa']['parts']
                lines.append(f"| {r['model']} | {r['batch_size']} | {_ms(dp['fwd'])} | {_ms(mp['fwd'])} | "
                             f"{_ms(dp['bwd'])} | {_ms(mp['bwd'])} | {_ms(dp['opt'])} | {_ms(mp['opt'])} | "
                             f"{r['dense'].get('faults_per_step', float('nan')):.0f} | "
                             f"{r['masa'].get('faults_per_step', float('nan')):.0f} | "
                             f"{'yes' if r.get('isolated') else 'no'} | {r.get('malloc', 'default')} |")
        aa = [r for r in train if 'aa_ratio' in r]
        if aa:
            lines += ['', 'Training A/A arm (`--aa-arm`): the dense twin timed a second time in the same interleaving '
                      '(two identical models: the resolution of the training ratios in this run).', '',
                      '| model | batch | A/A ratio | A/A paired | MASA / dense | MASA / dense paired |',
                      '|---|---|---|---|---|---|']
            for r in aa:
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['aa_ratio']:.3f} | {r['aa_paired']:.3f} | "
                             f"{r['ratio']:.3f} | {r['paired_ratio']['median']:.3f} |")
        comp = [r for r in results['speed'] if r['compiled']]
        if comp:
            lines += ['', 'Compile (first call) s: ' + '; '.join(
                f"{r['model']} {r['mode']} b{r['batch_size']}: dense {r['dense']['first_call_s']:.1f}, "
                f"MASA {r['masa']['first_call_s']:.1f}" for r in comp)]
    if results['memory']:
        cuda = results['memory'][0]['metric'] == 'cuda_max_allocated_mb'
        lines += ['', f"Peak training memory ({results['memory'][0]['steps']} AdamW steps, fresh process per twin; "
                      + ('torch.cuda.max_memory_allocated' if cuda else
                         'peak RSS (VmHWM) with the high-water mark reset after the imports; "above start" subtracts the RSS of the '
                         'interpreter + torch + timm at that point; malloc "default" is glibc as users run it, "mmap" '
                         'a fixed 64 KiB mmap threshold, under which the peak RSS follows the peak of live tensors '
                         'rather than heap fragmentation') + '):', '']
        if cuda:
            lines += ['| model | batch | dense MiB | MASA MiB | ratio | target | met |', '|---|---|---|---|---|---|---|']
            for r in results['memory']:
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['dense']['cuda_max_allocated_mb']:.0f} | "
                             f"{r['masa']['cuda_max_allocated_mb']:.0f} | {r['ratio']:.3f} | <= 1.00 | {_met(r['met'])} |")
        else:
            lines += ['| malloc | model | batch | dense peak MiB | MASA peak MiB | ratio | dense above start | '
                      'MASA above start | ratio above start | target | met |', '|---|---|---|---|---|---|---|---|---|---|---|']
            for r in results['memory']:
                d, m = r['dense'], r['masa']
                lines.append(
                    f"| {r.get('allocator', 'default')} | {r['model']} | {r['batch_size']} | {d['rss_peak_mb']:.0f} | "
                    f"{m['rss_peak_mb']:.0f} | "
                    f"{r['ratio']:.3f} | {d['rss_peak_mb'] - d['rss_start_mb']:.0f} | "
                    f"{m['rss_peak_mb'] - m['rss_start_mb']:.0f} | {r['ratio_above_start']:.3f} | <= 1.00 | "
                    f"{_met(r['met'])} |")
    if results['conversions']:
        lines += ['', 'Conversions (seconds, median of the repeats):', '',
                  '| what | median s | min s | max s | target | met |', '|---|---|---|---|---|---|']
        for r in results['conversions']:
            extra = f" (steady eval call {r['steady_median']:.3f} s: the first costs {r['extra_s'] * 1e3:+.0f} ms)" \
                if 'steady_median' in r else ''
            lines.append(f"| {r['what']}{extra} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
                         f"{'< %g s' % r['target_s'] if r.get('target_s') else ''} | {_met(r.get('met'))} |")
    prof = results.get('profile')
    if prof:
        lines += [
            '', f"Profile ({prof['time']} time): {prof['model']} training step, batch {prof['batch_size']}, torch.profiler, per step "
                f"(mean of {prof['steps']}; the profiler's own overhead inflates small ops):", '',
            f"- {prof['time']} time, all ops: dense {prof['total_self_ms']['dense']:.0f} ms, "
            f"MASA {prof['total_self_ms']['masa']:.0f} ms",
            f"- weight composition forward (`masa::compose`, {prof['num_atom_linears']} layers): "
            f"{prof['compose_fwd_ms']:.1f} ms",
            f"- composition backward nodes (Bmm/Cat/Squeeze/Unsqueeze/Select/Slice backward, self time): "
            f"dense {prof['compose_bwd_nodes_ms']['dense']:.1f} ms, MASA {prof['compose_bwd_nodes_ms']['masa']:.1f} ms",
            f"- AdamW step: dense {prof['adamw_ms']['dense']:.1f} ms, MASA {prof['adamw_ms']['masa']:.1f} ms",
            f"- the reconstruction alone (compose all {prof['num_atom_linears']} layers + backward, unprofiled): "
            f"{prof['reconstruction_fwd_bwd_ms']:.1f} ms",
            f"- eval cache hit: {prof['cache_hit_us_per_layer']:.1f} us per layer, "
            f"{prof['cache_hit_us_per_forward'] / 1e3:.2f} ms per forward (a miss composes in "
            f"{prof['compose_us_per_layer']:.0f} us per layer)",
            f"  (its top ops, profiled: " + ', '.join(
                f"`{r['op']}` {r['ms']:.1f} ms x{r['calls']}" for r in prof.get('reconstruction_ops', [])[:6]) + ')',
            '', '| op | dense ms | MASA ms | MASA - dense ms | dense calls | MASA calls |', '|---|---|---|---|---|---|',
        ]
        for r in prof['op_diff']:
            lines.append(f"| `{r['op']}` | {r['dense_ms']:.1f} | {r['masa_ms']:.1f} | {r['diff_ms']:+.1f} | "
                         f"{r['dense_calls']} | {r['masa_calls']} |")
    return '\n'.join(lines) + '\n'


def write_markdown(path: str, text: str, section: str) -> None:
    """Write the tables to `path`; when it already holds this section's markers (e.g. docs/speed.md), replace only
    what lies between them, so that re-running the benchmark updates the committed document in place."""
    begin, end = f'<!-- bench_speed:{section}:begin -->', f'<!-- bench_speed:{section}:end -->'
    old = open(path).read() if os.path.exists(path) else ''
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        text = head + begin + '\n' + text + end + rest.split(end, 1)[1]
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def _cases(grids):
    for g in grids:
        for name in g['models']:
            for mode in g['modes']:
                for bs in g['batch_sizes']:
                    yield name, mode, bs


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    if args.timing_worker is not None:
        timing_worker(json.loads(args.timing_worker))
        return
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    preset = PRESETS[args.preset]
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    args.model_kwargs = json.loads(args.model_kwargs)
    args.repeats = args.repeats or preset['repeats']
    args.eval_repeats = args.eval_repeats or max(args.repeats, preset['eval_repeats'])
    args.warmup = preset['warmup'] if args.warmup is None else args.warmup
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda given but torch.cuda.is_available() is False')
    grids, mem_grids = preset['grids'], preset['memory']
    if args.models or args.batch_sizes or args.modes:
        models = args.models or sorted({m for g in grids for m in g['models']})
        bss = args.batch_sizes or sorted({b for g in grids for b in g['batch_sizes']})
        modes = args.modes.split(',') if args.modes else ['train', 'eval']
        grids = [dict(models=models, batch_sizes=bss, modes=modes)]
        mem_grids = [dict(models=models, batch_sizes=bss)] if 'train' in modes else []
    compiled_flags = {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]

    results = dict(meta=machine_info(args), speed=[], memory=[], conversions=[], profile=None)
    results['meta']['command'] = 'python ' + ' '.join([os.path.relpath(__file__)] + sys.argv[1:])
    results['meta']['load_start'] = _loadavg()

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)
        if args.markdown:
            write_markdown(args.markdown, to_markdown(results), args.markdown_section)

    for compiled in compiled_flags if args.speed else []:
        for name, mode, bs in _cases(grids):
            t0 = time.perf_counter()
            try:
                r = time_case(name, mode, bs, args, device, compiled)
            except Exception as e:  # compile unsupported on this platform: record it and go on
                if not compiled:
                    raise
                _logger.warning('torch.compile failed for %s %s b%d: %r', name, mode, bs, e)
                results['speed'].append(dict(model=name, mode=mode, batch_size=bs, compiled=True, error=repr(e)))
                continue
            results['speed'].append(r)
            _logger.info('%s %s b%d%s: dense %.1f ms, MASA %.1f ms, ratio %.3f (paired %.3f; CPU time %.3f / %.3f) '
                         '[%.0f s]', name, mode, bs, ' compiled' if compiled else '', r['dense']['median'] * 1e3,
                         r['masa']['median'] * 1e3, r['ratio'], r['paired_ratio']['median'], r['cpu_ratio'],
                         r['paired_cpu_ratio'], time.perf_counter() - t0)
            save()
    if args.memory:
        allocators = ['default'] if device.type == 'cuda' else \
            {'default': ['default'], 'mmap': ['mmap'], 'both': ['default', 'mmap']}[args.memory_allocator]
        for allocator in allocators:
            for g in mem_grids:
                for name in g['models']:
                    for bs in g['batch_sizes']:
                        r = measure_memory(name, bs, args, device, allocator)
                        results['memory'].append(r)
                        _logger.info('memory (%s allocator) %s b%d: ratio %.3f', allocator, name, bs, r['ratio'])
                        save()
    if args.conversions:
        results['conversions'] = time_conversions(args, device)
        for r in results['conversions']:
            _logger.info('%s: %.3f s', r['what'], r['median'])
        save()
    if args.profile:
        results['profile'] = profile_breakdown(args, device)
        save()
    results['meta']['load_end'] = _loadavg()
    # compile errors go into JSON only; the table lists measured cases
    errors = [r for r in results['speed'] if 'error' in r]
    results['speed'] = [r for r in results['speed'] if 'error' not in r]
    results['compile_errors'] = errors
    save()
    print(to_markdown(results))


if __name__ == '__main__':
    main()
