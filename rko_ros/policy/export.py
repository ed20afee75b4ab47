"""ONNX export of the whole inference: images + state + noise -> unnormalized actions.

Normalisation, the observation encoders and the unrolled DDIM loop are all inside one graph, so
the robot needs numpy + onnxruntime only (policy/runtime.py). The card that goes beside the ONNX
file records everything the runtime and the policy node check before acting.
"""
import os
import tempfile
import warnings

import torch
from torch import nn
import yaml

from rko_ros.errors import ModelFileError
from rko_ros.policy.runtime import sha256_of

OPSET = 17
CARD_FORMAT = 'rko_ros.card/1'


class InferenceGraph(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, images, state, noise):
        return self.policy.sample(images, state, noise)


def io_spec(config, batch='batch'):
    obs, act = config.obs, config.action
    h, w = obs.image_size_px
    return {
        'inputs': [
            {'name': 'images', 'dtype': 'uint8',
             'shape': [batch, obs.n_obs_steps, len(obs.camera_names), 3, h, w]},
            {'name': 'state', 'dtype': 'float32', 'shape': [batch, obs.n_obs_steps, obs.state_dim]},
            {'name': 'noise', 'dtype': 'float32', 'shape': [batch, act.horizon, act.action_dim]},
        ],
        'outputs': [{'name': 'actions', 'dtype': 'float32',
                     'shape': [batch, act.horizon, act.action_dim]}],
    }


def make_card(config, onnx_path, **extra):
    obs, act = config.obs, config.action
    card = {'format': CARD_FORMAT, **io_spec(config),
            'camera_names': list(obs.camera_names), 'image_size_px': list(obs.image_size_px),
            'image_encoding': 'rgb8', 'joint_names': list(obs.joint_names),
            'action_names': list(act.action_names), 'n_obs_steps': obs.n_obs_steps,
            'horizon': act.horizon, 'n_action_steps': act.n_action_steps,
            'control_rate_hz': act.control_rate_hz,
            'num_inference_steps': config.diffusion.num_inference_steps,
            'onnx_file': os.path.basename(onnx_path), 'onnx_sha256': sha256_of(onnx_path),
            'opset': OPSET, 'policy_config': config.to_dict()}
    card.update(extra)
    return card


def write_card(path, card):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.card-', suffix='.tmp', dir=directory)
    with os.fdopen(fd, 'w') as f:
        yaml.safe_dump(card, f, sort_keys=False)
    os.replace(tmp, path)


def export_onnx(policy, onnx_path, **card_extra):
    """Write `onnx_path` and return its card (not yet written: see write_card / ModelStore)."""
    policy = policy.eval().cpu()
    cfg = policy.config
    obs, act = cfg.obs, cfg.action
    h, w = obs.image_size_px
    images = torch.zeros(1, obs.n_obs_steps, len(obs.camera_names), 3, h, w, dtype=torch.uint8)
    state = torch.zeros(1, obs.n_obs_steps, obs.state_dim)
    noise = torch.zeros(1, act.horizon, act.action_dim)
    directory = os.path.dirname(os.path.abspath(onnx_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.policy-', suffix='.onnx', dir=directory)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about python ints in the DDIM loop
            torch.onnx.export(
                InferenceGraph(policy), (images, state, noise), tmp, dynamo=False,
                input_names=['images', 'state', 'noise'], output_names=['actions'],
                dynamic_axes={'images': {0: 'batch'}, 'state': {0: 'batch'},
                              'noise': {0: 'batch'}, 'actions': {0: 'batch'}},
                opset_version=OPSET, do_constant_folding=True)
        os.replace(tmp, onnx_path)
    except Exception as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ModelFileError(f'ONNX export to {onnx_path} failed: {exc}') from exc
    norm = policy.action_normalizer   # what the graph unnormalises with: coherent chunks use it
    action_range = [[float(lo), float(hi)] for lo, hi in zip(norm.lo.tolist(), norm.hi.tolist())]
    return make_card(cfg, onnx_path, action_range=action_range, **card_extra)
