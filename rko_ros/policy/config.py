"""Configuration of the diffusion policy: one dataclass per concern, one YAML file for all of them.

Every hyperparameter has one home here, with its meaning in a comment. Validation happens in
`__post_init__` and raises ConfigError naming the field, the value and what is allowed.
Imports only the standard library and yaml (the torch-free runtime may read it).
"""
import dataclasses
import math
from typing import List, Optional, Tuple

import yaml

from rko_ros.errors import ConfigError


PRECISIONS = ('fp32', 'bf16', 'auto')   # TrainConfig.precision


def _check(condition, message):
    if not condition:
        raise ConfigError(message)


def check_event_weight(value, name='train.event_weight', error=ConfigError):
    """`value` as a float, or `error` naming `name` unless it is a number in 1..100 (how many
    times as often event windows are drawn; 1 = every window alike)."""
    if not (isinstance(value, (int, float)) and 1.0 <= float(value) <= 100.0):
        raise error(f'{name}={value} must be 1..100 (1 = every window alike)')
    return float(value)


def check_precision(value, name='train.precision'):
    """A ConfigError naming `name` unless `value` is one of PRECISIONS."""
    _check(value in PRECISIONS, f"{name}='{value}' must be one of {', '.join(PRECISIONS)}")


@dataclasses.dataclass
class ObsConfig:
    # Camera names in the order the model stacks them (N axis); the card repeats this order.
    camera_names: List[str] = dataclasses.field(default_factory=lambda: ['camera'])
    image_size_px: Tuple[int, int] = (64, 64)      # (H, W) the encoder sees
    n_obs_steps: int = 2                           # To: frames of history per camera
    joint_names: List[str] = dataclasses.field(
        default_factory=lambda: ['gripper_x', 'gripper_y', 'gripper_closed'])

    @property
    def state_dim(self):
        return len(self.joint_names)

    def __post_init__(self):
        self.camera_names = list(self.camera_names)
        self.joint_names = list(self.joint_names)
        self.image_size_px = tuple(int(v) for v in self.image_size_px)
        _check(len(self.camera_names) >= 1, 'obs.camera_names is empty; name at least one camera')
        _check(len(set(self.camera_names)) == len(self.camera_names),
               f'obs.camera_names={self.camera_names} has duplicates')
        _check(len(self.image_size_px) == 2 and all(16 <= v <= 1024 for v in self.image_size_px),
               f'obs.image_size_px={self.image_size_px} must be (H, W) with 16 <= H, W <= 1024')
        _check(1 <= self.n_obs_steps <= 16, f'obs.n_obs_steps={self.n_obs_steps} must be 1..16')
        _check(len(self.joint_names) >= 1, 'obs.joint_names is empty; the state needs >= 1 joint')


@dataclasses.dataclass
class ActionConfig:
    action_names: List[str] = dataclasses.field(
        default_factory=lambda: ['gripper_x', 'gripper_y', 'gripper_closed'])
    horizon: int = 16               # H: actions predicted per chunk
    n_action_steps: int = 8         # actions executed from each chunk before re-planning
    control_rate_hz: float = 10.0   # rate the actions are meant to be executed at

    @property
    def action_dim(self):
        return len(self.action_names)

    def __post_init__(self):
        self.action_names = list(self.action_names)
        _check(len(self.action_names) >= 1, 'action.action_names is empty')
        _check(self.horizon >= 4 and self.horizon % 4 == 0,
               f'action.horizon={self.horizon} must be a multiple of 4 (the UNet halves it twice)')
        _check(1 <= self.n_action_steps <= self.horizon,
               f'action.n_action_steps={self.n_action_steps} must be 1..horizon ({self.horizon})')
        _check(0.5 <= self.control_rate_hz <= 1000.0,
               f'action.control_rate_hz={self.control_rate_hz} must be 0.5..1000')


@dataclasses.dataclass
class ModelConfig:
    encoder_channels: Tuple[int, ...] = (16, 32, 64)   # ResNet-style stages, stride 2 each
    encoder_blocks_per_stage: int = 1
    # Stride of each stage's first block; () = (1, 2, 2, ...) as in ResNet. A stride of 1 in the
    # last stage doubles the resolution the spatial-softmax keypoints are read at (finer localisation).
    encoder_strides: Tuple[int, ...] = ()
    feature_dim: int = 64          # per-camera feature after spatial-softmax keypoints + linear
    down_dims: Tuple[int, ...] = (64, 128, 256)       # ConditionalUnet1D widths
    kernel_size: int = 5
    n_groups: int = 8              # GroupNorm groups (BatchNorm is replaced, as Chi et al. do)
    diffusion_step_embed_dim: int = 64

    def __post_init__(self):
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.encoder_strides = tuple(int(c) for c in self.encoder_strides)
        _check(not self.encoder_strides or (
            len(self.encoder_strides) == len(self.encoder_channels)
            and all(st in (1, 2) for st in self.encoder_strides)),
            f'model.encoder_strides={self.encoder_strides} needs one stride (1 or 2) per stage of '
            f'encoder_channels={self.encoder_channels}, or () for the default')
        self.down_dims = tuple(int(c) for c in self.down_dims)
        _check(len(self.encoder_channels) >= 1, 'model.encoder_channels is empty')
        for c in self.encoder_channels + self.down_dims:
            _check(c % self.n_groups == 0,
                   f'model channel width {c} is not divisible by n_groups={self.n_groups}')
        _check(len(self.down_dims) >= 2, f'model.down_dims={self.down_dims} needs >= 2 levels')
        _check(self.kernel_size % 2 == 1, f'model.kernel_size={self.kernel_size} must be odd')
        _check(self.feature_dim >= 8, f'model.feature_dim={self.feature_dim} must be >= 8')


@dataclasses.dataclass
class DiffusionConfig:
    num_train_timesteps: int = 100
    beta_schedule: str = 'squaredcos_cap_v2'
    prediction_type: str = 'epsilon'
    num_inference_steps: int = 10      # DDIM steps at inference (exported into the ONNX graph)

    def __post_init__(self):
        _check(self.beta_schedule in ('squaredcos_cap_v2', 'linear'),
               f"diffusion.beta_schedule='{self.beta_schedule}': use 'squaredcos_cap_v2' or 'linear'")
        _check(self.prediction_type == 'epsilon',
               f"diffusion.prediction_type='{self.prediction_type}': only 'epsilon' is supported")
        _check(10 <= self.num_train_timesteps <= 1000,
               f'diffusion.num_train_timesteps={self.num_train_timesteps} must be 10..1000')
        _check(1 <= self.num_inference_steps <= self.num_train_timesteps,
               f'diffusion.num_inference_steps={self.num_inference_steps} must be '
               f'1..num_train_timesteps ({self.num_train_timesteps})')


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    ema_decay: float = 0.995        # 0 disables EMA
    seed: int = 0
    num_threads: int = 0            # torch intra-op threads; 0 = torch's default
    # Random translation of each training window's camera images by up to +-shift_px pixels
    # (edge pixels repeated), as DrQ's random shift / Chi et al.'s random crop. 0 = off.
    shift_px: int = 0
    # For one fixed top-down camera whose image axes are table axes: the joints whose state and
    # action move with the image, {joint: ['col' or 'row', units per pixel]}. A shifted window is
    # then the same scene moved on the table (exact for the sim's orthographic camera): a new
    # placement of the object for every window. Empty: only the image moves.
    shift_joints: dict = dataclasses.field(default_factory=dict)
    # Arithmetic of the BC forward pass: 'fp32'; 'bf16' (torch.autocast to bfloat16; the weights,
    # the optimizer and the EMA copy stay float32, so the model written is the same kind); 'auto'
    # = on a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX) the faster of the two,
    # timed on a few steps of a throwaway copy first (policy.train.time_precisions: native is
    # not always faster), fp32 elsewhere.
    # Fine-tuning stays fp32: its losses are differences of two models' denoising errors.
    precision: str = 'fp32'
    # Event windows: those in which the binary action `event_action` (a gripper command) switches
    # within the actions executed before the next plan (the chunk's first n_action_steps, or
    # against the joint of that name observed at the chunk's start) are drawn `event_weight`
    # times as often as the others. Grasps and releases are a third of the windows and decide
    # a fold. 1 (or no event_action) = every window alike, the sampling as before.
    event_action: str = ''
    event_weight: float = 1.0

    def __post_init__(self):
        _check(self.steps >= 1, f'train.steps={self.steps} must be >= 1')
        self.event_action = str(self.event_action or '')
        self.event_weight = check_event_weight(self.event_weight)
        _check(self.event_weight == 1.0 or self.event_action,
               f'train.event_weight={self.event_weight} needs train.event_action: the binary '
               f'action (e.g. the gripper command) whose switches mark the event windows')
        check_precision(self.precision)
        _check(0 <= int(self.shift_px) <= 32, f'train.shift_px={self.shift_px} must be 0..32')
        self.shift_px = int(self.shift_px)
        joints = {}
        for joint, spec in dict(self.shift_joints or {}).items():
            ok = isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] in ('col', 'row')
            try:
                per_px = float(spec[1]) if ok else math.nan
            except (TypeError, ValueError):
                per_px = math.nan
            _check(math.isfinite(per_px), f"train.shift_joints['{joint}']={spec!r} must be "
                                          f"['col' or 'row', finite units per pixel]")
            joints[str(joint)] = [spec[0], per_px]
        self.shift_joints = joints
        _check(self.batch_size >= 1, f'train.batch_size={self.batch_size} must be >= 1')
        _check(0 < self.lr < 1, f'train.lr={self.lr} must be in (0, 1)')
        _check(0 <= self.ema_decay < 1, f'train.ema_decay={self.ema_decay} must be in [0, 1)')


@dataclasses.dataclass
class PolicyConfig:
    obs: ObsConfig = dataclasses.field(default_factory=ObsConfig)
    action: ActionConfig = dataclasses.field(default_factory=ActionConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    _SECTIONS = {'obs': ObsConfig, 'action': ActionConfig, 'model': ModelConfig,
                 'diffusion': DiffusionConfig, 'train': TrainConfig}

    def __post_init__(self):
        known = set(self.obs.joint_names) | set(self.action.action_names)
        unknown = sorted(set(self.train.shift_joints) - known)
        _check(not unknown, f'train.shift_joints names {unknown}, which are neither obs.joint_names '
                            f'{self.obs.joint_names} nor action.action_names')
        _check(not self.train.event_action or self.train.event_action in self.action.action_names,
               f"train.event_action='{self.train.event_action}' is not one of action.action_names "
               f'{self.action.action_names}')
        _check(not self.train.shift_joints or len(self.obs.camera_names) == 1,
               f'train.shift_joints moves positions with one camera image; this policy has '
               f'{len(self.obs.camera_names)} cameras ({self.obs.camera_names})')

    def to_dict(self):
        out = {}
        for name in self._SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    @classmethod
    def from_dict(cls, data):
        data = dict(data or {})
        unknown = set(data) - set(cls._SECTIONS)
        _check(not unknown, f'unknown config sections {sorted(unknown)}; '
                            f'allowed: {sorted(cls._SECTIONS)}')
        kwargs = {}
        for name, section_cls in cls._SECTIONS.items():
            values = dict(data.get(name) or {})
            fields = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - fields
            _check(not bad, f'unknown keys {sorted(bad)} in config section {name!r}; '
                            f'allowed: {sorted(fields)}')
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f'cannot read policy config {path}: {exc.strerror}') from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f'policy config {path} is not valid YAML: {exc}') from exc
        return cls.from_dict(data)

    def to_yaml(self, path):
        with open(path, 'w') as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def preset(cls, name='small', **overrides):
        """`small`: CPU demo sizes. `default`: Chi et al.'s real-robot sizes (ResNet18-like widths)."""
        presets = {
            'small': {},
            'default': {
                'obs': {'image_size_px': [96, 96]},
                'model': {'encoder_channels': [64, 128, 256, 512], 'encoder_blocks_per_stage': 2,
                          'feature_dim': 256, 'down_dims': [256, 512, 1024],
                          'diffusion_step_embed_dim': 128},
                'train': {'steps': 50000, 'batch_size': 64},
            },
        }
        _check(name in presets, f"unknown preset '{name}'; choose one of {sorted(presets)}")
        data = {k: dict(v) for k, v in presets[name].items()}
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        return cls.from_dict(data)
