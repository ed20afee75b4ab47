"""The robot's inference path: numpy + onnxruntime + yaml only, never torch.

`PolicyRuntime` loads one model version (policy.onnx + card.yaml), checks that the file is the one
the card describes, picks the fastest execution provider present (TensorRT, CUDA, CPU) and runs
the whole denoising loop in one call. Inputs are validated: a wrong shape, dtype or a NaN raises
PolicyInputError, never an action computed from bad data.
"""
import hashlib
import os
import threading
import time

import numpy as np
import yaml

from rko_ros.errors import ConfigError, ModelFileError, PolicyInputError

# CUDA graph capture must not overlap another thread's CUDA work (a synchronous copy or an
# allocation there invalidates the capture, or fails): a hot swap captures the new model while the
# control loop still runs the old one. Every run on the CUDA provider and every capture take it.
_CUDA_LOCK = threading.Lock()

PREFERRED_PROVIDERS = ('TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider')
_DTYPES = {'uint8': np.uint8, 'float32': np.float32}


# The initial diffusion noise of a chunk is N(0, noise_scale^2). 1 samples the action distribution
# the policy was trained on (Diffusion Policy); below 1 the deterministic DDIM sampler starts
# nearer the middle of that distribution, and 0 gives one chunk per observation. A lower scale
# does not only steady a chunk: it chooses the behaviour. On the simulated cloth (2026-11-28,
# 80 new cloths) the pretrained models of seeds 0 and 1 fold left_to_right 39 / 33% of the time
# at 1, 54 / 53% at 0.5 and 90 / 100% at 0: the denoiser run from zero noise reaches that style.
# The seed-0 demo's aligned model: preferred-style success 85.6% at 1, 91.25% at 0.5, 93.75% at 0
# (two noise draws), with its left_to_right folds succeeding about 92% of the time at 1 and 0.5
# alike: the gain is the style share, not the execution. Measure before and after at one scale.
MAX_NOISE_SCALE = 2.0


def check_noise_scale(value):
    value = float(value)
    if not 0.0 <= value <= MAX_NOISE_SCALE:
        raise ConfigError(f'noise_scale={value} must be 0..{MAX_NOISE_SCALE} (1 = sample the '
                          f'trained distribution, 0 = deterministic chunks)')
    return value


# Coherent chunks: a new chunk is sampled `chunk_candidates` times (one batched call) and the
# candidate whose first actions lie closest to what the previous chunk planned for the same
# instants is kept (backward coherence, as in bidirectional decoding: Liu et al. 2024). Separate
# chunks of a diffusion policy are independent draws, so one can switch between the modes the
# demonstrations hold halfway through a motion (a carry that drifts sideways); a coherent choice
# keeps the plan the robot is already following. The first chunk of an episode, which has no
# previous plan, is candidate 0, so the choice of behaviour is the policy's own.
MAX_CHUNK_CANDIDATES = 32


def check_chunk_candidates(value):
    try:
        whole = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole or not 1 <= int(value) <= MAX_CHUNK_CANDIDATES:
        raise ConfigError(f'chunk_candidates={value} must be an integer 1..{MAX_CHUNK_CANDIDATES} '
                          f'(1 = one sample per chunk, as trained; 4 = pick the most coherent '
                          f'of four)')
    return int(value)


def action_scale(card):
    """(A,) factors putting each action dim in the model's normalised units (2 / range), from the
    card's `action_range`; ones for a card exported before it was recorded."""
    ranges = card.get('action_range')
    if not ranges:
        return np.ones(len(card['action_names']), np.float32)
    span = np.array([hi - lo for lo, hi in ranges], np.float32)
    return (2.0 / np.maximum(span, 1e-6)).astype(np.float32)


def coherent_choice(chunks, previous, scale=None):
    """Index (B,) of the candidate closest to the previous plan.

    `chunks` (B, K, H, A); `previous` (B, M, A): the previous chunk's actions for the instants of
    a new chunk's first M actions (M <= H), or None (no plan yet: candidate 0). Distance: the sum
    over those M steps and the action dims of ((candidate - previous) * scale)^2, `scale` (A,)
    putting the dims in comparable units (`PolicyRuntime.action_scale`).
    """
    chunks = np.asarray(chunks)
    if previous is None:
        return np.zeros(chunks.shape[0], dtype=int)
    previous = np.asarray(previous)
    m = min(previous.shape[1], chunks.shape[2])
    if m == 0:
        return np.zeros(chunks.shape[0], dtype=int)
    scale = np.ones(chunks.shape[-1], np.float32) if scale is None else np.asarray(scale)
    diff = (chunks[:, :, :m] - previous[:, None, :m]) * scale
    return np.argmin((diff ** 2).sum(axis=(2, 3)), axis=1)


def choose_coherent(predict, images, state, noise, previous, scale=None):
    """Run `predict(images, state, noise)` on the K draws of `noise` (B, K, H, A) of each of the
    B observations in one batched call and keep, per observation, the chunk nearest `previous`
    (`coherent_choice`). Returns (actions (B, H, A), index (B,))."""
    b, k = noise.shape[:2]
    flat = predict(np.repeat(images, k, axis=0), np.repeat(np.asarray(state), k, axis=0),
                   noise.reshape((b * k,) + noise.shape[2:]))
    chunks = flat.reshape((b, k) + flat.shape[1:])
    index = coherent_choice(chunks, previous, scale)
    return chunks[np.arange(b), index], index


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def choose_providers(requested=None):
    import onnxruntime as ort
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelFileError(f'execution providers {missing} are not available here '
                                 f'(available: {available}); install onnxruntime-gpu '
                                 f'(requirements/gpu.txt) or drop them')
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available]


class PolicyRuntime:
    def __init__(self, model_dir, providers=None, intra_op_threads=0, batch_size=None,
                 cuda_graph=False):
        """`batch_size` fixes the batch axis (1 for a robot): ONNX Runtime then folds the shape
        arithmetic away and inputs/outputs stay in buffers bound once. `cuda_graph` (CUDA
        provider only, implies batch 1) captures the whole chunk - encoders and every DDIM step,
        about 3300 kernels - in one CUDA graph when it loads and replays it on every call."""
        import onnxruntime as ort
        if os.path.isdir(model_dir):
            self.onnx_path = os.path.join(model_dir, 'policy.onnx')
        else:
            self.onnx_path, model_dir = model_dir, os.path.dirname(model_dir)
        self.model_dir = os.path.abspath(model_dir)
        card_path = os.path.join(self.model_dir, 'card.yaml')
        for path in (self.onnx_path, card_path):
            if not os.path.isfile(path):
                raise ModelFileError(f'{path} is missing; export the model with `rko export`')
        try:
            with open(card_path) as f:
                self.card = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ModelFileError(f'card {card_path} is not valid YAML: {exc}') from exc
        if not isinstance(self.card, dict) or 'inputs' not in self.card:
            raise ModelFileError(f'card {card_path} has no inputs section; re-export the model')
        expected_sha = self.card.get('onnx_sha256')
        actual_sha = sha256_of(self.onnx_path)
        if expected_sha != actual_sha:
            raise ModelFileError(
                f'{self.onnx_path} has sha256 {actual_sha[:12]}..., its card says '
                f'{str(expected_sha)[:12]}...: the file was replaced or damaged; re-export it or '
                f'roll back to another version')
        self.version = self.card.get('version') or os.path.basename(self.model_dir)
        self.input_spec = {spec['name']: spec for spec in self.card['inputs']}
        self.last_latency_ms = None
        chosen = choose_providers(providers)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:
            if batch_size not in (None, 1):
                raise ModelFileError(f'cuda_graph runs batch 1, not batch_size={batch_size}')
            batch_size = 1
            if not chosen or chosen[0] != 'CUDAExecutionProvider':
                raise ModelFileError(f'cuda_graph needs the CUDAExecutionProvider first; the '
                                     f'providers here are {chosen} (install onnxruntime-gpu, '
                                     f'requirements/gpu.txt, or run without a CUDA graph)')
            chosen = [('CUDAExecutionProvider', {'enable_cuda_graph': '1'})] + chosen[1:]
        self.batch_size = None if batch_size is None else int(batch_size)
        if self.batch_size is not None and self.batch_size < 1:
            raise ModelFileError(f'batch_size must be at least 1, got {batch_size}')
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        if self.batch_size is not None:
            batch_dim = self.card['inputs'][0]['shape'][0]
            if isinstance(batch_dim, str):
                options.add_free_dimension_override_by_name(batch_dim, self.batch_size)
            elif batch_dim != self.batch_size:
                raise ModelFileError(f'{self.onnx_path} was exported for batch {batch_dim}, '
                                     f'not {self.batch_size}')
        try:
            self.session = ort.InferenceSession(self.onnx_path, options, providers=chosen)
        except Exception as exc:
            what = ' with a CUDA graph' if self.cuda_graph else ''
            raise ModelFileError(f'ONNX Runtime cannot load {self.onnx_path}{what}: {exc}') from exc
        self.provider = self.session.get_providers()[0]
        self._check_graph_against_card()
        self._lock = threading.Lock()
        self._binding = self._bind() if self.batch_size is not None else None
        if self.cuda_graph:  # capture now, not in the robot's first control tick
            try:
                self.predict(*self._zero_inputs())
            except Exception as exc:
                raise ModelFileError(f'ONNX Runtime cannot capture {self.onnx_path} in a CUDA '
                                     f'graph: {exc}') from exc

    def _check_graph_against_card(self):
        graph = {i.name: i for i in self.session.get_inputs()}
        for spec in self.card['inputs']:
            node = graph.get(spec['name'])
            if node is None:
                raise ModelFileError(f"card input '{spec['name']}' is not an input of "
                                     f'{self.onnx_path} (graph inputs {sorted(graph)}); re-export')
            graph_shape = [d if isinstance(d, int) else None for d in node.shape]
            card_shape = [d if isinstance(d, int) else None for d in spec['shape']]
            if self.batch_size is not None:  # the session reports the overridden batch axis
                graph_shape[0] = card_shape[0] = None
            if graph_shape != card_shape:
                raise ModelFileError(f"input '{spec['name']}': graph shape {node.shape} != card "
                                     f"shape {spec['shape']}; the card belongs to another model")

    def _bind(self):
        """Input and output buffers bound once (on the GPU for a CUDA graph, which replays
        against fixed addresses); predict copies each call's data into them."""
        import onnxruntime as ort
        device = 'cuda' if self.provider == 'CUDAExecutionProvider' else 'cpu'
        binding = self.session.io_binding()
        buffers = {}
        for spec in self.card['inputs'] + self.card['outputs']:
            shape = [self.batch_size] + list(spec['shape'][1:])
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _DTYPES[spec['dtype']]),
                                                     device, 0)
            buffers[spec['name']] = value
            if spec in self.card['outputs']:
                binding.bind_ortvalue_output(spec['name'], value)
            else:
                binding.bind_ortvalue_input(spec['name'], value)
        return binding, buffers

    def _zero_inputs(self):
        return [np.zeros(self.input_spec[name]['shape'][1:], _DTYPES[self.input_spec[name]['dtype']])
                for name in ('images', 'state', 'noise')]

    def _run(self, feeds):
        with _CUDA_LOCK if self.provider == 'CUDAExecutionProvider' else self._lock:
            if self._binding is None:
                return self.session.run(['actions'], feeds)[0]
            binding, buffers = self._binding   # one set of bound buffers: the lock guards it
            for name, value in feeds.items():
                buffers[name].update_inplace(value)
            self.session.run_with_iobinding(binding)
            return buffers['actions'].numpy()

    # --- queries -----------------------------------------------------------------------------
    @property
    def horizon(self):
        return int(self.card['horizon'])

    @property
    def action_dim(self):
        return len(self.card['action_names'])

    @property
    def action_scale(self):
        return action_scale(self.card)

    def check_matches(self, camera_names=None, joint_names=None, image_size_px=None,
                      action_names=None, control_rate_hz=None):
        """Raise ModelFileError naming the first difference between the card and the caller's setup."""
        checks = [('camera_names', camera_names, 'camera order'),
                  ('joint_names', joint_names, 'state joints'),
                  ('image_size_px', image_size_px, 'image size (H, W)'),
                  ('action_names', action_names, 'action names')]
        for key, value, what in checks:
            if value is not None and list(value) != list(self.card[key]):
                raise ModelFileError(f'{what}: node has {list(value)}, model {self.version} expects '
                                     f'{list(self.card[key])} (card.yaml {key}); fix the parameter '
                                     f'or load a model trained for this setup')
        if control_rate_hz is not None and abs(control_rate_hz - self.card['control_rate_hz']) > 1e-6:
            raise ModelFileError(f"control_rate_hz: node runs at {control_rate_hz} Hz, model "
                                 f"{self.version} was trained at {self.card['control_rate_hz']} Hz")

    # --- inference ---------------------------------------------------------------------------
    def _validate(self, name, value, batched):
        spec = self.input_spec[name]
        dtype = _DTYPES[spec['dtype']]
        value = np.asarray(value)
        if value.dtype != dtype:
            raise PolicyInputError(f'{name}: got dtype {value.dtype}, model {self.version} expects '
                                   f"{spec['dtype']}; convert it (images are uint8 RGB, "
                                   f'channels-first)')
        expected = [value.shape[0] if batched else None] + list(spec['shape'][1:])
        shape = list(value.shape) if batched else [None] + list(value.shape)
        if shape != expected:
            got = tuple(value.shape)
            want = tuple(expected[1:] if not batched else expected)
            hint = ('resize the camera image to card.yaml image_size_px or re-export'
                    if name == 'images' else 'check joint order and n_obs_steps in card.yaml')
            raise PolicyInputError(f'{name}: got shape {got}, model {self.version} expects {want}; '
                                   f'{hint}')
        if value.dtype.kind == 'f' and not np.isfinite(value).all():
            raise PolicyInputError(f'{name}: holds NaN or inf (first at index '
                                   f'{tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])}); refusing to act '
                                   f'on it: check the sensor driver')
        return np.ascontiguousarray(value)

    def predict(self, images, state, noise=None, seed=None, noise_scale=1.0):
        """images (To,N,3,H,W) uint8 + state (To,S) -> actions (H,A); batched inputs add a B axis.

        Without `noise`, the chunk's initial diffusion noise is drawn here (from `seed`) and scaled
        by `noise_scale` (see `check_noise_scale`); noise passed in is used as given."""
        noise_scale = check_noise_scale(noise_scale)
        if noise is not None and noise_scale != 1.0:
            raise PolicyInputError(f'noise_scale={noise_scale} with noise passed in: scale the '
                                   f'noise you pass, or let predict draw it')
        images = np.asarray(images)
        batched = images.ndim == len(self.input_spec['images']['shape'])
        images = self._validate('images', images, batched)
        state = self._validate('state', state, batched)
        b = images.shape[0] if batched else 1
        if batched and state.shape[0] != b:
            raise PolicyInputError(f'state batch {state.shape[0]} != images batch {b}')
        if self.batch_size is not None and b != self.batch_size:
            raise PolicyInputError(f'this runtime of model {self.version} runs batch '
                                   f'{self.batch_size}{" (CUDA graph)" if self.cuda_graph else ""}, '
                                   f'got {b}; load another PolicyRuntime for batched rollouts')
        if noise is None:
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal((b, self.horizon, self.action_dim)).astype(np.float32)
            noise *= np.float32(noise_scale)
            noise = noise if batched else noise[0]
        noise = self._validate('noise', noise, batched)
        feeds = {'images': images if batched else images[None],
                 'state': state if batched else state[None],
                 'noise': noise if batched else noise[None]}
        start = time.perf_counter()
        actions = self._run(feeds)
        self.last_latency_ms = (time.perf_counter() - start) * 1e3
        if not np.isfinite(actions).all():
            raise PolicyInputError(f'model {self.version} produced NaN/inf actions; not acting. '
                                   f'Roll back (policy/rollback) and check the training run')
        return actions if batched else actions[0]

    def predict_coherent(self, images, state, previous=None, candidates=4, noise=None, seed=None,
                         noise_scale=1.0):
        """`predict` for `candidates` noise draws at once, keeping per observation the chunk most
        coherent with `previous` (see `coherent_choice`). Returns (actions, chosen index).

        Unbatched: images (To,N,3,H,W), state (To,S), previous (M,A) or None, noise (K,H,A) or
        None -> actions (H,A), index (int). Batched: a leading B axis on each (noise (B,K,H,A);
        `previous` None or (B,M,A)) -> (B,H,A), (B,). Noise not passed in is drawn from `seed` and
        scaled by `noise_scale`; candidate 0 then gets the draw `predict(seed=seed)` would use.
        """
        candidates = check_chunk_candidates(candidates)
        noise_scale = check_noise_scale(noise_scale)
        images = np.asarray(images)
        batched = images.ndim == len(self.input_spec['images']['shape'])
        if not batched:
            images, state = images[None], np.asarray(state)[None]
            previous = None if previous is None else np.asarray(previous)[None]
            noise = None if noise is None else np.asarray(noise)[None]
        b = images.shape[0]
        if noise is None:
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal((b * candidates, self.horizon, self.action_dim))
            noise = noise.astype(np.float32).reshape(candidates, b, self.horizon, self.action_dim)
            noise = (noise.transpose(1, 0, 2, 3) * np.float32(noise_scale))
        elif noise_scale != 1.0:
            raise PolicyInputError(f'noise_scale={noise_scale} with noise passed in: scale the '
                                   f'noise you pass, or let predict_coherent draw it')
        noise = np.asarray(noise)
        if noise.shape[:2] != (b, candidates):
            raise PolicyInputError(f'noise: got shape {noise.shape}, expected {candidates} '
                                   f'candidates per observation ({b}, {candidates}, horizon, A)')
        if previous is not None:
            previous = np.asarray(previous, np.float32)
            if previous.ndim != 3 or previous.shape[0] != b \
                    or previous.shape[2] != self.action_dim or previous.shape[1] > self.horizon:
                raise PolicyInputError(f'previous plan: got shape {previous.shape}, expected '
                                       f'({b}, M <= {self.horizon}, {self.action_dim})')
            if not np.isfinite(previous).all():
                raise PolicyInputError('previous plan holds NaN or inf: no chunk is chosen against '
                                       'it (pass None to take the first draw)')
        actions, index = choose_coherent(self.predict, images, state, noise, previous,
                                         self.action_scale)
        return (actions, index) if batched else (actions[0], int(index[0]))
