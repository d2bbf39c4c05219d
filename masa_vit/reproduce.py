""" Paper-comparison grids: train every (dataset, model shape, sharing method, S, seed) cell and tabulate the results

    python -m masa_vit.reproduce --grid configs/grids/digits.yaml                # run (or resume) the whole grid
    python -m masa_vit.reproduce --grid configs/grids/digits.yaml --dry-run      # list the cells, their budgets
    python -m masa_vit.reproduce --grid configs/grids/cifar100.yaml --seeds 0 --set data_dir=/data/cifar100

A grid YAML names the datasets, model shapes, sharing methods, atom counts S and seeds; every combination is one cell,
one ordinary run of the training script (`masa_vit.train`, in a subprocess of its own: isolated, with its own thread
count). Each cell has a stable id, a hash of its resolved training config, and a folder under the output folder:

    OUTPUT/cells/<dataset>-<model>-<method>[-S<s>]-seed<n>-<id>/
        cell.yaml       the cell's complete training config (`python train_vit.py --config cell.yaml` reruns it)
        train/          the training run's folder (args.yaml, summary.csv, checkpoints)
        train.log       its log
        attempts.jsonl  one line per launch (return code, wall time, CPU load)
        result.json     written when the run finished: the cell is done and skipped from then on
        failed.json     written when the run failed: reported, and retried on the next invocation
    OUTPUT/runs.csv     one row per run (done or failed)
    OUTPUT/results.md   the table, in the layout of the paper's ViT comparison (mean +- std over seeds)
    OUTPUT/results.png  top-1 vs parameters per method, error bars = std over seeds

Running the same command again skips the finished cells; a cell whose run was interrupted resumes from its last
epoch checkpoint (`--resume`), a failed one starts again. Changing the recipe changes the cells' ids, so they are
trained anew into new folders (the old ones stay where they are).

Grid YAML keys (see configs/grids/digits.yaml):
    name          name of the grid (default: the file name), the default output folder is output/reproduce/<name>
    description   free text
    seeds         list of seeds (override: --seeds)
    threads       torch CPU threads per run (override: --threads; default: torch's choice)
    jobs          runs at a time (override: --jobs; default 1)
    num_atoms     list of S values for the methods that take one (masa, low_rank, sequential, cycle); an integer or
                  'L/k' (the number of blocks divided by k, e.g. 'L/3')
    config        a training config YAML every cell starts from
    train         training flags for every cell (the keys of the training configs: batch_size, epochs, ...)
    datasets      name -> training flags (dataset, data_dir, num_classes, ...; optionally its own `config`)
    models        name -> training flags (model, model_kwargs, ...; optionally its own `config`)
    methods       name -> the model's sharing options (sharing, share, num_kv_heads, dictionary, coef, rank, ...); they
                  replace every sharing option of the levels above, shape options (depth, embed_dim, ...) are kept
Later levels win: config < train < dataset < model < --set < method.
"""
import argparse
import copy
import csv
import difflib
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ['GridError', 'Cell', 'CellRun', 'load_grid', 'expand_cells', 'run_grid', 'write_reports', 'main']

_logger = logging.getLogger('reproduce')

GRID_KEYS = (
    'name', 'description', 'seeds', 'threads', 'jobs', 'num_atoms', 'config', 'train', 'datasets', 'models', 'methods')
# methods that take a number of atoms S (low_rank: the rank that gives MASA's budget at that S)
METHODS_WITH_S = ('masa', 'low_rank', 'sequential', 'cycle')
# flags the harness sets itself per cell
RESERVED_KEYS = ('seed', 'output', 'experiment', 'resume', 'eval_only')
# flags that do not change what a run computes: left out of the cell id, so changing them retrains nothing
NON_RESULT_KEYS = (
    'output', 'experiment', 'data_dir', 'threads', 'workers', 'log_interval', 'coef_log_interval', 'progress',
    'tensorboard', 'checkpoint_hist', 'pin_mem', 'dataset_download', 'persistent_workers', 'config',
)
CSV_COLUMNS = (
    'cell_id', 'dataset', 'model', 'method', 'sharing', 'S', 'seed', 'status', 'top1', 'top5', 'best_top1',
    'best_epoch', 'epochs', 'params', 'attention_params', 'attention_params_dense', 'attention_compression',
    'mlp_params', 'mlp_compression', 'wall_time_s', 'cpu_time_s', 'load_avg', 'error', 'output_dir',
)
# the subprocess: the training entry point, its returned metrics saved as JSON (argv[1]) for the harness
_CHILD = ('import json, sys; from masa_vit.train import main; r = main(sys.argv[2:]); '
          'json.dump(dict(r or {}), open(sys.argv[1], "w"), default=str)')


class GridError(ValueError):
    """A grid YAML that cannot be run as written (unknown key or method, bad value), reported as one clear line."""


@dataclass
class Cell:
    """One run of the grid: a complete training config and where its results go."""
    dataset: str
    model: str
    method: str
    sharing: str
    S: Optional[int]
    seed: int
    config: Dict[str, Any]
    cell_id: str = ''
    note: str = ''
    depth: int = 0
    counts: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        s = f'-S{self.S}' if self.S is not None else ''
        return _slug(f'{self.dataset}-{self.model}-{self.method}{s}-seed{self.seed}') + f'-{self.cell_id[:10]}'

    @property
    def label(self) -> str:
        s = f' S={self.S}' if self.S is not None else ''
        return f'{self.dataset} / {self.model} / {self.method}{s} / seed {self.seed}'


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9._+-]+', '_', text)


def _unknown(key: str, known: Sequence[str], where: str, what: str = 'key') -> GridError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return GridError(f"{where}: unknown {what} '{key}'{hint}. Known: {', '.join(known)}.")


def _train_actions() -> Dict[str, argparse.Action]:
    """The training script's flags, by config key."""
    from . import train
    _, parser = train._build_parsers()
    return {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}


def _sharing_keys() -> Tuple[str, ...]:
    """The model's sharing options: the arguments of MasaVisionTransformer beyond timm's VisionTransformer."""
    from .masa_vision_transformer import MasaVisionTransformer
    params = inspect.signature(MasaVisionTransformer.__init__).parameters
    return tuple(n for n, p in params.items() if n != 'self' and p.kind is not inspect.Parameter.VAR_KEYWORD)


def _read_yaml(path: str, where: str) -> Any:
    if not os.path.isfile(path):
        raise GridError(f'{where}: file {path} not found.')
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise GridError(f'{path} is not valid YAML: {e}') from e


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """Training flags of `over` win; `model_kwargs` are merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == 'model_kwargs':
            out[k] = dict(out.get(k) or {}, **(v or {}))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _flags(level: Any, where: str, actions: Dict[str, argparse.Action], from_file: bool = False) -> Dict[str, Any]:
    """A level of training flags (optionally on top of its own `config` file), checked against the training flags.

    The flags the harness sets per cell (seed, output, ...) are errors in the grid and dropped from a config file.
    """
    if level is None:
        return {}
    if not isinstance(level, dict):
        raise GridError(f'{where} must be a mapping of training flags, not {level!r}.')
    out: Dict[str, Any] = {}
    if level.get('config') and not from_file:
        path = str(level['config'])
        base = _read_yaml(path, where)
        if not isinstance(base, dict):
            raise GridError(f'{where}: config {path} must be a mapping of flag names to values.')
        out = _flags(base, f'{where}: config {path}', actions, from_file=True)
    for key, value in level.items():
        dest = str(key).replace('-', '_')
        if dest == 'config':
            continue
        if dest not in actions:
            raise _unknown(key, sorted(actions), where, 'training flag')
        if dest in RESERVED_KEYS:
            if from_file:
                continue
            raise GridError(f"{where}: '{key}' is set by the harness for every cell (seeds: the grid's `seeds`, "
                            f"outputs: --output of masa_vit.reproduce); remove it.")
        if dest == 'model_kwargs' and value is not None and not isinstance(value, dict):
            raise GridError(f'{where}: model_kwargs must be a mapping (e.g. {{depth: 6}}), not {value!r}.')
        out = _merge(out, {dest: value})
    return out


def load_grid(path: str, seeds: Optional[Sequence[int]] = None, overrides: Optional[Dict[str, Any]] = None,
              only_methods: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Read and check a grid YAML (`seeds`, `only_methods`: overrides); `GridError` names the bad key or value."""
    raw = _read_yaml(path, 'grid')
    if not isinstance(raw, dict):
        raise GridError(f'{path} must be a mapping with the keys {", ".join(GRID_KEYS)}.')
    for key in raw:
        if key not in GRID_KEYS:
            raise _unknown(key, GRID_KEYS, path)
    for key in ('datasets', 'models', 'methods'):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise GridError(f'{path}: `{key}` must be a non-empty mapping of names to options.')
    actions = _train_actions()
    sharing_keys = _sharing_keys()
    from .masa_vision_transformer import SHARING_METHODS

    grid = dict(name=str(raw.get('name') or os.path.splitext(os.path.basename(path))[0]),
                description=str(raw.get('description') or ''), path=path)
    grid['seeds'] = [int(s) for s in (seeds if seeds is not None else raw.get('seeds', [0]))]
    if not grid['seeds'] or len(set(grid['seeds'])) != len(grid['seeds']):
        raise GridError(f'{path}: seeds must be a non-empty list of distinct integers, not {grid["seeds"]}.')
    threads = raw.get('threads')
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise GridError(f'{path}: threads must be a positive integer, not {threads!r}.')
    grid['threads'] = threads
    jobs = raw.get('jobs')
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise GridError(f'{path}: jobs must be a positive integer, not {jobs!r}.')
    grid['jobs'] = jobs
    atoms = raw.get('num_atoms', ['L/3'])
    atoms = atoms if isinstance(atoms, list) else [atoms]
    for s in atoms:
        if not (isinstance(s, int) and s >= 1 or isinstance(s, str) and re.fullmatch(r'L/\d+', s.replace(' ', ''))):
            raise GridError(f"{path}: num_atoms entries must be positive integers or 'L/k' (e.g. 'L/3'), not {s!r}.")
    grid['num_atoms'] = atoms

    top = _merge(_flags({'config': raw['config']} if raw.get('config') else None, path, actions),
                 _flags(raw.get('train'), f'{path}: train', actions))
    grid['train'] = top
    grid['datasets'] = OrderedDict((str(n), _flags(v, f'{path}: datasets.{n}', actions))
                                   for n, v in raw['datasets'].items())
    grid['models'] = OrderedDict((str(n), _flags(v, f'{path}: models.{n}', actions)) for n, v in raw['models'].items())
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in actions:
            raise _unknown(key, sorted(actions), '--set', 'training flag')
        if key in RESERVED_KEYS or key == 'model_kwargs':
            raise GridError(f'--set {key}: not settable for a whole grid.')
    grid['overrides'] = overrides
    methods = OrderedDict()
    for name, opts in raw['methods'].items():
        where = f'{path}: methods.{name}'
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise GridError(f'{where} must be a mapping of sharing options (e.g. {{sharing: masa, share: qkv}}).')
        for key in opts:
            if key not in sharing_keys:
                raise _unknown(key, sharing_keys, where, 'sharing option')
        sharing = opts.get('sharing', 'masa')
        if sharing not in SHARING_METHODS:
            raise GridError(f"{where}: unknown method sharing={sharing!r}; the methods are "
                            f"{', '.join(SHARING_METHODS)}.")
        methods[str(name)] = dict(opts, sharing=sharing)
    if only_methods:
        for name in only_methods:
            if name not in methods:
                raise _unknown(name, list(methods), '--methods', 'method')
        methods = OrderedDict((n, m) for n, m in methods.items() if n in only_methods)
    grid['methods'] = methods
    return grid


def _resolve_atoms(spec: Any, depth: int) -> int:
    if isinstance(spec, int):
        return spec
    return max(1, depth // int(spec.replace(' ', '').split('/')[1]))


def _build_meta(config: Dict[str, Any]):
    """The cell's model, built without memory (meta device), as the training script builds it."""
    import timm
    import torch
    import masa_vit  # noqa: F401  registers the models
    kwargs = dict(config.get('model_kwargs') or {})
    with torch.device('meta'):
        return timm.create_model(
            config.get('model', 'masa_vit_small'), num_classes=config['num_classes'], global_pool=config.get('gp'),
            **kwargs)


def _cell_id(config: Dict[str, Any]) -> str:
    keyed = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    blob = json.dumps(keyed, sort_keys=True, default=str, separators=(',', ':'))
    return hashlib.sha1(blob.encode()).hexdigest()


def expand_cells(grid: Dict[str, Any]) -> List[Cell]:
    """Every cell of the grid, seed-major (all cells of the first seed first), each with its id and budget.

    Each distinct model is built once on the meta device (no memory, no init cost): a bad model option fails here,
    before anything trains, and the parameter counts of every cell are known up front.
    """
    from .masa_vision_transformer import count_params
    sharing_keys = set(_sharing_keys())
    built: Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]] = {}

    def build(config: Dict[str, Any], where: str):
        key = json.dumps([config.get('model'), config.get('model_kwargs'), config.get('num_classes'),
                          config.get('gp')], sort_keys=True, default=str)
        if key not in built:
            try:
                model = _build_meta(config)
            except (TypeError, ValueError, RuntimeError, AssertionError) as e:
                raise GridError(f"{where}: cannot build model {config.get('model')!r} with "
                                f"{config.get('model_kwargs')}: {e}") from e
            built[key] = (count_params(model), dict(getattr(model, 'masa_kwargs', {}), depth=len(model.blocks)))
        return built[key]

    sections = []
    for ds_name, ds_flags in grid['datasets'].items():
        for model_name, model_flags in grid['models'].items():
            base = _merge(_merge(_merge(grid['train'], ds_flags), model_flags), grid['overrides'])
            where = f"{grid['path']}: datasets.{ds_name} x models.{model_name}"
            if not base.get('num_classes'):
                raise GridError(f'{where}: num_classes is not set (give it with the dataset, e.g. num_classes: 10): '
                                f'the harness counts parameters before training.')
            base['model_kwargs'] = {k: v for k, v in (base.get('model_kwargs') or {}).items()
                                    if k not in sharing_keys}
            _, info = build(_merge(base, {'model_kwargs': {'sharing': 'dense'}}), where)
            for method, opts in grid['methods'].items():
                atoms = [None]
                if opts['sharing'] in METHODS_WITH_S and 'num_atoms' not in opts:
                    atoms = list(OrderedDict.fromkeys(_resolve_atoms(s, info['depth']) for s in grid['num_atoms']))
                for s in atoms:
                    kwargs = dict(opts, **({'num_atoms': s} if s is not None else {}))
                    config = _merge(base, {'model_kwargs': kwargs})
                    counts, masa_kwargs = build(config, f'{where} x methods.{method}')
                    sections.append((ds_name, model_name, method, opts['sharing'], s, config, counts, masa_kwargs))
    cells = []
    for seed in grid['seeds']:
        for ds_name, model_name, method, sharing, s, config, counts, masa_kwargs in sections:
            config = dict(config, seed=seed)
            config = {k: v for k, v in config.items() if k not in ('output', 'experiment')}
            if s is None and sharing in METHODS_WITH_S:
                s = masa_kwargs.get('num_atoms')
            note = ''
            if sharing == 'low_rank':
                note = f"r={masa_kwargs.get('rank')}"
            elif sharing == 'gqa':
                note = f"{masa_kwargs.get('num_kv_heads')} kv head" + ('s' if masa_kwargs.get('num_kv_heads') != 1
                                                                       else '')
            cells.append(Cell(dataset=ds_name, model=model_name, method=method, sharing=sharing, S=s, seed=seed,
                              config=config, cell_id=_cell_id(config), note=note, depth=masa_kwargs['depth'],
                              counts=dict(counts)))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        dup = next(c for c in cells if ids.count(c.cell_id) > 1)
        raise GridError(f"{grid['path']}: two cells have the same training config ({dup.label}): two method entries "
                        f"(or S values) describe the same model.")
    return cells


def _validate_configs(cells: Sequence[Cell]) -> None:
    """Each distinct config through the training script's own config check (types, choices), before any run."""
    from . import train
    _, parser = train._build_parsers()
    seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            config = dict(cell.config, seed=0)
            key = _cell_id(config)
            if key in seen:
                continue
            seen.add(key)
            path = os.path.join(tmp, 'cell.yaml')
            with open(path, 'w') as f:
                yaml.safe_dump(config, f, sort_keys=False)
            try:
                train.load_config_defaults(parser, path)
            except train.TrainError as e:
                raise GridError(f'{cell.label}: ' + str(e).replace(path + ': ', '').replace(path, 'the config')) from e


# -- running cells


def _atomic_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_summary(path: str) -> List[Dict[str, float]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        try:
            out.append({k: float(v) for k, v in row.items() if v not in (None, '')})
        except ValueError:
            continue
    return out


def cell_status(cell_dir: str, cell_id: str) -> str:
    """'done' (result.json of this cell), 'failed' (failed.json), 'partial' (a checkpoint to resume) or 'pending'."""
    result = _read_json(os.path.join(cell_dir, 'result.json'))
    if result is not None and result.get('cell_id') == cell_id and result.get('status') == 'done':
        return 'done'
    if os.path.isfile(os.path.join(cell_dir, 'failed.json')):
        return 'failed'
    if os.path.isfile(os.path.join(cell_dir, 'train', 'last.pth.tar')):
        return 'partial'
    return 'pending'


class _Stop:
    """SIGTERM / SIGINT to the harness: pass it to the running cells (they save a resumable checkpoint), then stop."""

    def __init__(self):
        self.requested = False
        self.running: List['CellRun'] = []
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        _logger.warning(f'{signal.Signals(signum).name} received: stopping once the running cells saved a '
                        f'checkpoint (their next run resumes from it).')
        for run in self.running:
            if run.returncode is None:
                os.kill(run.proc.pid, signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


class CellRun:
    """One cell's training subprocess (resuming the cell's last checkpoint if there is one).

    `poll()` returns None while it runs, then the cell's new status: 'done' (result.json written), 'failed'
    (failed.json written) or 'interrupted' (stopped by a signal; resumable).
    """

    def __init__(self, cell: Cell, cell_dir: str, threads: Optional[int] = None):
        self.cell, self.cell_dir = cell, cell_dir
        os.makedirs(cell_dir, exist_ok=True)
        cell_yaml = os.path.join(cell_dir, 'cell.yaml')
        with open(cell_yaml, 'w') as f:
            f.write(f'# {cell.label} (cell {cell.cell_id})\n'
                    f'# python train_vit.py --config {cell_yaml} --output OUTPUT\n')
            yaml.safe_dump(cell.config, f, sort_keys=False)
        self.train_dir = os.path.join(cell_dir, 'train')
        last = os.path.join(self.train_dir, 'last.pth.tar')
        self.resumed = os.path.isfile(last)
        if not self.resumed and os.path.isdir(self.train_dir):
            shutil.rmtree(self.train_dir)  # a run stopped before its first checkpoint: nothing to keep
        self.child_json = os.path.join(cell_dir, 'child_result.json')
        if os.path.exists(self.child_json):
            os.remove(self.child_json)
        cmd = [sys.executable, '-c', _CHILD, self.child_json, '--config', cell_yaml, '--output', self.train_dir]
        if self.resumed:
            cmd += ['--resume', last]
        env = dict(os.environ)
        self.threads = threads or cell.config.get('threads')
        if self.threads:
            cmd += ['--threads', str(self.threads)]
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.load_start = os.getloadavg()[0]
        self.t0 = time.time()
        self.returncode: Optional[int] = None
        with open(os.path.join(cell_dir, 'train.log'), 'a') as log:
            log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(cmd[:1] + cmd[3:])}\n')
            log.flush()
            # a session of its own: Ctrl-C reaches it once, through the harness, so it can save a checkpoint
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def poll(self, block: bool = False) -> Optional[str]:
        if self.returncode is None:
            try:
                pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
            except InterruptedError:
                return None
            if pid == 0:
                return None
            self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_time = usage.ru_utime + usage.ru_stime  # what the run costs without other jobs around
            self.wall_time = time.time() - self.t0
        return self._finish()

    def _finish(self) -> str:
        cell, cell_dir, rc = self.cell, self.cell_dir, self.returncode
        load = (self.load_start + os.getloadavg()[0]) / 2
        child = _read_json(self.child_json) or {}
        attempt = dict(started=time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.t0)),
                       wall_time_s=round(self.wall_time, 2), cpu_time_s=round(self.cpu_time, 2), returncode=rc,
                       resumed=self.resumed, interrupted=bool(child.get('interrupted')), load_avg=round(load, 2),
                       threads=self.threads)
        attempts_path = os.path.join(cell_dir, 'attempts.jsonl')
        with open(attempts_path, 'a') as f:
            f.write(json.dumps(attempt) + '\n')
        failed_path = os.path.join(cell_dir, 'failed.json')
        summary = _read_summary(os.path.join(self.train_dir, 'summary.csv'))
        if rc == 0 and child and not child.get('interrupted') and summary:
            with open(attempts_path) as f:
                attempts = [json.loads(line) for line in f if line.strip()]
            wall = sum(a['wall_time_s'] for a in attempts)
            best = max(summary, key=lambda r: r.get('eval_top1', -1))
            result = _record(cell, cell_dir, 'done')
            result.update(
                top1=summary[-1].get('eval_top1'), top5=summary[-1].get('eval_top5'), best_top1=best.get('eval_top1'),
                best_epoch=int(best['epoch']), epochs=len(summary), wall_time_s=round(wall, 2),
                cpu_time_s=round(sum(a.get('cpu_time_s', 0) for a in attempts), 2),
                load_avg=round(sum(a['load_avg'] * a['wall_time_s'] for a in attempts) / max(wall, 1e-9), 2),
                finished=time.strftime('%Y-%m-%d %H:%M:%S'))
            _atomic_json(os.path.join(cell_dir, 'result.json'), result)
            if os.path.exists(failed_path):
                os.remove(failed_path)
            return 'done'
        if child.get('interrupted') or rc in (-signal.SIGTERM, -signal.SIGINT, 130, 143):
            return 'interrupted'  # resumable: neither done nor failed
        tail = _log_tail(os.path.join(cell_dir, 'train.log'))
        error = next((line for line in reversed(tail.splitlines()) if line.startswith('error:')), '') or \
            (tail.strip().splitlines()[-1] if tail.strip() else f'exit code {rc}')
        failed = _record(cell, cell_dir, 'failed')
        failed.update(returncode=rc, error=error.strip(), log_tail=tail, wall_time_s=round(self.wall_time, 2),
                      cpu_time_s=round(self.cpu_time, 2), load_avg=round(load, 2))
        _atomic_json(failed_path, failed)
        return 'failed'


def _record(cell: Cell, cell_dir: str, status: str) -> Dict[str, Any]:
    c = cell.counts
    return OrderedDict(
        cell_id=cell.cell_id, dataset=cell.dataset, model=cell.model, method=cell.method, sharing=cell.sharing,
        S=cell.S, seed=cell.seed, status=status, note=cell.note, params=c.get('total'),
        attention_params=c.get('attention'), attention_params_dense=c.get('attention_dense'),
        attention_compression=c.get('attention_compression'), mlp_params=c.get('mlp'),
        mlp_compression=c.get('mlp_compression'), output_dir=cell_dir)


# -- reports


def _collect(cells: Sequence[Cell], output: str) -> List[Dict[str, Any]]:
    """One record per cell: its result.json, failed.json, or a pending placeholder."""
    records = []
    for cell in cells:
        cell_dir = os.path.join(output, 'cells', cell.name)
        status = cell_status(cell_dir, cell.cell_id)
        if status == 'done':
            rec = _read_json(os.path.join(cell_dir, 'result.json'))
        elif status == 'failed':
            rec = _read_json(os.path.join(cell_dir, 'failed.json')) or _record(cell, cell_dir, 'failed')
        else:
            rec = _record(cell, cell_dir, 'pending')
        rec['note'] = cell.note  # recomputed, also for records written by older versions
        records.append(rec)
    return records


def _fmt_count(n: Optional[float]) -> str:
    if n is None:
        return '-'
    return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}K'


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _groups(records: Sequence[Dict[str, Any]]):
    """{(dataset, model): {(method, S): [records]}} in grid order."""
    sections: 'OrderedDict[Tuple[str, str], OrderedDict]' = OrderedDict()
    for rec in records:
        rows = sections.setdefault((rec['dataset'], rec['model']), OrderedDict())
        rows.setdefault((rec['method'], rec['S']), []).append(rec)
    return sections


def write_csv(records: Sequence[Dict[str, Any]], path: str) -> None:
    """One row per run (done or failed); output_dir relative to the CSV's folder, so the file can be moved."""
    root = os.path.dirname(os.path.abspath(path))
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction='ignore')
        writer.writeheader()
        for rec in records:
            if rec['status'] in ('done', 'failed'):
                row = {k: rec.get(k, '') for k in CSV_COLUMNS}
                row['output_dir'] = os.path.relpath(os.path.abspath(row['output_dir']), root)
                writer.writerow(row)
    os.replace(tmp, path)


def markdown_table(records: Sequence[Dict[str, Any]], grid: Dict[str, Any], command: Any = '') -> str:
    """The paper's ViT comparison layout: per dataset and shape, one row per method and S, top-1 mean +- std."""
    done = [r for r in records if r['status'] == 'done']
    lines = [f"# {grid['name']}: sharing methods at the same attention budget", '']
    if grid.get('description'):
        lines += [grid['description'].strip(), '']
    commands = [command] if isinstance(command, str) else list(command)
    commands = [c for c in commands if c]
    if len(commands) == 1:
        lines += [f'Command: `{commands[0]}`', '']
    elif commands:
        lines += ['Commands that trained into this folder, in order:', ''] + [f'- `{c}`' for c in commands] + ['']
    if grid.get('overrides'):  # --set wins over the grid (and its description)
        lines += ['Overrides of the grid for every run: ' +
                  ', '.join(f'`{k}={v}`' for k, v in grid['overrides'].items()) + '.', '']
    wall = sum(r.get('wall_time_s') or 0 for r in done)
    cpu = sum(r.get('cpu_time_s') or 0 for r in done)
    elapsed = _elapsed([r['output_dir'] for r in done])
    loads = [r['load_avg'] for r in done if r.get('load_avg') is not None]
    lines += [
        f'Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores'
        + (f', torch threads per run: {grid["threads"]}' if grid.get('threads') else '')
        + (f', runs at a time: {grid["jobs"]}' if grid.get('jobs') else '')
        + f'; Python {platform.python_version()}, torch {_version("torch")}, timm {_version("timm")}.',
        f'Runs: {len(done)} done, {sum(r["status"] == "failed" for r in records)} failed, '
        f'{sum(r["status"] == "pending" for r in records)} not run. Time: {elapsed / 60:.1f} min elapsed while runs '
        f'were going, {wall / 60:.1f} min summed over runs, {cpu / 60:.1f} CPU-minutes'
        + (f'; mean 1-min load average during the runs {statistics.fmean(loads):.1f} '
           f'(other jobs shared the machine when it exceeds the runs at a time).' if loads else '.'),
        '',
        'Top-1 / top-5: validation accuracy (%) after the last epoch, mean +- std (sample std) over seeds. '
        'Attention compression: 1 - attention parameters / those of the dense model (every Q, K, V, O weight and '
        'bias, shared atoms and coefficients included; the same for the MLP where it is shared). Params: all '
        'parameters of the model. vs dense: difference of the mean top-1 to the dense model\'s.',
        '',
    ]
    for (dataset, model), rows in _groups(records).items():
        # MASA on the MLP too (share='...+mlp'): its compression gets a column of its own
        show_mlp = any((r.get('mlp_compression') or 0) > 0 for rs in rows.values() for r in rs)
        lines += [f'## {dataset}, {model}', '',
                  '| Method | S | Attention compression | ' + ('MLP compression | ' if show_mlp else '') +
                  'Params | Attention params | Top-1 (%) | vs dense | Top-5 (%) | Runs |',
                  '|---|---|---|' + ('---|' if show_mlp else '') + '---|---|---|---|---|---|']
        dense = [r['top1'] for rs in rows.values() for r in rs if r['sharing'] == 'dense' and r['status'] == 'done']
        dense_mean = statistics.fmean(dense) if dense else None
        for (method, s), recs in rows.items():
            ok = [r for r in recs if r['status'] == 'done']
            r0 = recs[0]
            name = method + (f" ({r0['note']})" if r0.get('note') else '')
            top1 = top5 = delta = '-'
            if ok:
                m1, s1 = _mean_std([r['top1'] for r in ok])
                m5, s5 = _mean_std([r['top5'] for r in ok])
                top1, top5 = f'{m1:.2f} +- {s1:.2f}', f'{m5:.2f} +- {s5:.2f}'
                if dense_mean is not None and r0['sharing'] != 'dense':
                    delta = f'{m1 - dense_mean:+.2f}'
            failed = sum(r['status'] == 'failed' for r in recs)
            runs = f'{len(ok)}/{len(recs)}' + (f' ({failed} failed)' if failed else '')
            lines.append(
                f"| {name} | {s if s is not None else '-'} | {100 * (r0.get('attention_compression') or 0):.1f}% | "
                + (f"{100 * (r0.get('mlp_compression') or 0):.1f}% | " if show_mlp else '') +
                f"{_fmt_count(r0.get('params'))} | {_fmt_count(r0.get('attention_params'))} | {top1} | {delta} | "
                f"{top5} | {runs} |")
        lines.append('')
    failures = [r for r in records if r['status'] == 'failed']
    if failures:
        lines += ['## Failed runs', '']
        lines += [f"- {r['dataset']} / {r['model']} / {r['method']} / seed {r['seed']}: {r.get('error', '')} "
                  f"(log: {os.path.join(r['output_dir'], 'train.log')})" for r in failures]
        lines.append('')
    return '\n'.join(lines)


def _elapsed(cell_dirs: Sequence[str]) -> float:
    """Seconds during which at least one of these cells' runs was going (the union of their attempts' intervals)."""
    intervals = []
    for cell_dir in cell_dirs:
        try:
            with open(os.path.join(cell_dir, 'attempts.jsonl')) as f:
                for line in f:
                    a = json.loads(line)
                    t0 = time.mktime(time.strptime(a['started'], '%Y-%m-%d %H:%M:%S'))
                    intervals.append((t0, t0 + a['wall_time_s']))
        except (OSError, ValueError, KeyError):
            continue
    total, end = 0.0, float('-inf')
    for a, b in sorted(intervals):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001  metadata missing: the report says so, nothing else depends on it
        return 'unknown'


def write_plot(records: Sequence[Dict[str, Any]], path: str, title: str = '') -> None:
    """Top-1 vs total parameters, one marker and colour per method, error bars = std over seeds (Figure 2 style).

    One row per (dataset, model): left, top-1 vs parameters; right, the same means per method side by side (small dots:
    the single seeds), since methods at the same budget sit on top of each other in the left panel. The dashed line is
    the dense model's mean.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    sections = _groups(records)
    n = max(1, len(sections))
    fig = Figure(figsize=(12.5, 3.9 * n + 0.4), dpi=120, layout='constrained')
    markers = 'osD^vP*Xh<>p'
    methods = list(OrderedDict.fromkeys(r['method'] for r in records))
    style = {m: dict(color=f'C{i % 10}', marker=markers[i % len(markers)]) for i, m in enumerate(methods)}
    handles = {}
    for i, ((dataset, model), groups) in enumerate(sections.items()):
        ax, ax_bar = fig.add_subplot(n, 2, 2 * i + 1), fig.add_subplot(n, 2, 2 * i + 2)
        points = []  # (method, S, params, mean, std)
        for (method, s), recs in groups.items():
            ok = [r for r in recs if r['status'] == 'done']
            if ok:
                points.append((method, s, recs[0]['params'], *_mean_std([r['top1'] for r in ok]),
                               recs[0]['sharing'], [r['top1'] for r in ok]))
        for method in methods:
            pts = sorted((p for p in points if p[0] == method), key=lambda p: p[2])
            if not pts:
                continue
            handles[method] = ax.errorbar(
                [p[2] / 1e3 for p in pts], [p[3] for p in pts], yerr=[p[4] for p in pts], capsize=3, markersize=7,
                linestyle='-' if len(pts) > 1 else 'none', label=method, **style[method])
            if len(pts) > 1:
                for p in pts:
                    ax.annotate(f'S={p[1]}', (p[2] / 1e3, p[3]), textcoords='offset points', xytext=(4, 4), fontsize=7)
        for y, p in enumerate(points):
            ax_bar.errorbar([p[3]], [y], xerr=[p[4]], capsize=3, markersize=7, linestyle='none', **style[p[0]])
            ax_bar.scatter(p[6], [y + 0.22] * len(p[6]), s=9, color=style[p[0]]['color'], alpha=0.5)  # each seed
        ax_bar.set_yticks(range(len(points)), [p[0] + (f' S={p[1]}' if p[1] is not None else '') for p in points],
                          fontsize=8)
        ax_bar.invert_yaxis()
        dense = [p[3] for p in points if p[5] == 'dense']
        if dense:
            for a, vertical in ((ax, False), (ax_bar, True)):
                (a.axvline if vertical else a.axhline)(dense[0], color='grey', linestyle='--', linewidth=0.8)
        ax.set_title(f'{dataset}, {model}: top-1 vs parameters', fontsize=10)
        ax.set_xlabel('parameters (K)')
        ax.set_ylabel('top-1 (%)')
        ax_bar.set_title(f'{dataset}, {model}: top-1 per method', fontsize=10)
        ax_bar.set_xlabel('top-1 (%)')
        for a in (ax, ax_bar):
            a.grid(True, alpha=0.3)
    if handles:
        fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
                   loc='outside right center', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    tmp = path + '.tmp.png'
    fig.savefig(tmp)
    os.replace(tmp, path)


def write_reports(grid: Dict[str, Any], cells: Sequence[Cell], output: str, command: Any = '') -> Dict[str, str]:
    """runs.csv, results.md and results.png from the cells' result files; returns their paths."""
    records = _collect(cells, output)
    paths = dict(csv=os.path.join(output, 'runs.csv'), markdown=os.path.join(output, 'results.md'),
                 plot=os.path.join(output, 'results.png'))
    write_csv(records, paths['csv'])
    with open(paths['markdown'] + '.tmp', 'w') as f:
        f.write(markdown_table(records, grid, command))
    os.replace(paths['markdown'] + '.tmp', paths['markdown'])
    write_plot(records, paths['plot'], title=f"{grid['name']}: top-1 vs parameters (mean +- std over seeds "
                                             f"{', '.join(map(str, grid['seeds']))})")
    return paths


# -- the command


def run_grid(
        grid_path: str,
        output: Optional[str] = None,
        seeds: Optional[Sequence[int]] = None,
        threads: Optional[int] = None,
        jobs: Optional[int] = None,
        overrides: Optional[Dict[str, Any]] = None,
        methods: Optional[Sequence[str]] = None,
        dry_run: bool = False,
        report_only: bool = False,
        command: str = '',
) -> Dict[str, Any]:
    """Run (or resume) a grid; returns the cells, their statuses and the report paths.

    Raises `GridError` for a grid that cannot run as written, before anything trains.
    """
    grid = load_grid(grid_path, seeds=seeds, overrides=overrides, only_methods=methods)
    if threads:
        grid['threads'] = threads
    if jobs:
        grid['jobs'] = jobs
    cells = expand_cells(grid)
    _validate_configs(cells)
    output = output or os.path.join('output', 'reproduce', _slug(grid['name']))
    statuses = OrderedDict((c.cell_id, cell_status(os.path.join(output, 'cells', c.name), c.cell_id)) for c in cells)
    result = dict(grid=grid, cells=cells, statuses=statuses, output=output, reports={}, interrupted=False)
    if dry_run:
        return result
    os.makedirs(output, exist_ok=True)
    # grid.yaml: every command that trained into this folder, in order (the table lists them, not --report-only)
    grid_yaml = os.path.join(output, 'grid.yaml')
    state = _read_yaml(grid_yaml, 'grid.yaml') if os.path.isfile(grid_yaml) else None
    state = state if isinstance(state, dict) else {}
    commands = list(state.get('commands') or ([state['command']] if state.get('command') else []))
    if not report_only:
        commands.append(command)
        with open(grid_yaml, 'w') as f:
            yaml.safe_dump(dict(source=grid_path, commands=commands, seeds=grid['seeds'], threads=grid['threads'],
                                jobs=grid['jobs']), f, sort_keys=False)
    command = commands or [command]
    if not report_only:
        todo = [c for c in cells if statuses[c.cell_id] != 'done']
        jobs = grid['jobs'] or 1
        _logger.info(f"Grid {grid['name']}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run "
                     f"({jobs} at a time); output {output}")
        with _Stop() as stop:
            started = 0
            while (todo and not stop.requested) or stop.running:
                while todo and len(stop.running) < jobs and not stop.requested:
                    cell = todo.pop(0)
                    started += 1
                    cell_dir = os.path.join(output, 'cells', cell.name)
                    _logger.info(f'[{started}/{started + len(todo)}] start {cell.label} ({statuses[cell.cell_id]}) '
                                 f'-> {cell_dir}')
                    stop.running.append(CellRun(cell, cell_dir, threads=grid['threads']))
                for run in list(stop.running):
                    status = run.poll(block=len(stop.running) == 1 and not (todo and not stop.requested))
                    if status is None:
                        continue
                    stop.running.remove(run)
                    statuses[run.cell.cell_id] = status
                    path = os.path.join(run.cell_dir, 'result.json' if status == 'done' else 'failed.json')
                    rec = _read_json(path) or {}
                    if status == 'done':
                        _logger.info(f"    done {run.cell.label}: top-1 {rec.get('top1'):.2f} "
                                     f"({run.wall_time:.0f} s, {run.cpu_time:.0f} CPU-s)")
                    elif status == 'failed':
                        _logger.error(f"    FAILED {run.cell.label}: {rec.get('error')} "
                                      f"(log: {os.path.join(run.cell_dir, 'train.log')})")
                    else:
                        _logger.warning(f'    interrupted {run.cell.label}: the next run resumes it.')
                    # the reports stay current, so an interrupted grid still shows what is finished
                    write_reports(grid, cells, output, command)
                if stop.running:
                    time.sleep(0.5)
            result['interrupted'] = stop.requested
    result['reports'] = write_reports(grid, cells, output, command)
    return result


def _parse_set(values: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for item in values or []:
        if '=' not in item:
            raise GridError(f'--set expects KEY=VALUE, got {item!r}')
        key, value = item.split('=', 1)
        out[key.replace('-', '_')] = yaml.safe_load(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m masa_vit.reproduce',
        description='Run a grid of (dataset, model shape, sharing method, S, seed) training runs and write a CSV of '
                    'every run, a markdown table (mean +- std over seeds) and a plot of top-1 vs parameters.')
    parser.add_argument('--grid', required=True, metavar='YAML', help='grid file, e.g. configs/grids/digits.yaml')
    parser.add_argument('--output', default='', metavar='DIR', help='output folder (default: output/reproduce/<name>)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, metavar='N', help="override the grid's seeds")
    parser.add_argument('--threads', type=int, default=None, metavar='N', help='torch CPU threads per run')
    parser.add_argument('--jobs', type=int, default=None, metavar='N',
                        help="runs at a time (default: the grid's `jobs`, else 1; e.g. 2 one-thread runs on 2 cores)")
    parser.add_argument('--methods', nargs='+', default=None, metavar='NAME',
                        help="run only these of the grid's methods, e.g. --methods dense MASA-QKVO")
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='training flag for every cell, e.g. --set data_dir=/data/cifar100 epochs=50')
    parser.add_argument('--dry-run', action='store_true', help='list the cells (status, budget) and exit')
    parser.add_argument('--report-only', action='store_true',
                        help='rewrite the CSV / table / plot from the finished cells without training')
    args = parser.parse_args(argv)
    if not logging.root.handlers:
        logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    command = 'python -m masa_vit.reproduce ' + ' '.join(sys.argv[1:] if argv is None else argv)
    try:
        result = run_grid(args.grid, output=args.output or None, seeds=args.seeds, threads=args.threads, jobs=args.jobs,
                          overrides=_parse_set(args.set), methods=args.methods, dry_run=args.dry_run,
                          report_only=args.report_only, command=command)
    except GridError as e:
        _logger.error(str(e))
        raise SystemExit(f'error: {e}') from e
    statuses = result['statuses']
    if args.dry_run:
        width = {k: max([len(k)] + [len(str(getattr(c, k))) for c in result['cells']]) for k in
                 ('dataset', 'model', 'method')}
        print(f"{'#':>3} {'status':8} {'cell':12} {'dataset':{width['dataset']}} {'model':{width['model']}} "
              f"{'method':{width['method']}} {'S':>3} {'seed':>4} {'params':>9} {'attention':>9} {'compression':>11}")
        for i, c in enumerate(result['cells']):  # the listing is this command's output
            print(f"{i + 1:>3} {statuses[c.cell_id]:8} {c.cell_id[:12]:12} {c.dataset:{width['dataset']}} "
                  f"{c.model:{width['model']}} {c.method:{width['method']}} {c.S if c.S is not None else '-':>3} "
                  f"{c.seed:>4} {_fmt_count(c.counts['total']):>9} {_fmt_count(c.counts['attention']):>9} "
                  f"{100 * c.counts['attention_compression']:>10.1f}%")
        done = sum(s == 'done' for s in statuses.values())
        print(f"{len(statuses)} cells, {done} done, {len(statuses) - done} to run; output {result['output']}")
        return 0
    for kind, path in result['reports'].items():
        _logger.info(f'Wrote {path}')
    failed = [c for c in result['cells'] if statuses[c.cell_id] == 'failed']
    if failed:
        _logger.error(f'{len(failed)} cell(s) failed: ' + '; '.join(c.label for c in failed))
    if result['interrupted']:
        return 130
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
