"""Model versions under `data_dir/models/`: `<version>/{checkpoint.pt, policy.onnx, card.yaml}`.

`models/active` names the live version. A version is built in a hidden temporary folder and renamed
into place, so a crash or a killed trainer never leaves a half model; `active` is replaced
atomically too. Version names sort by creation: `v0001-pretrain`, `v0002-rko`, ...
Torch is imported only by the methods that need it, so the runtime and the nodes can list and
read versions without it.
"""
import os
import re
import shutil
import tempfile
import time

import yaml

from rko_ros.errors import ModelFileError

_VERSION_RE = re.compile(r'^v(\d{4,})-[A-Za-z0-9_.-]+$')


class ModelStore:
    def __init__(self, data_dir):
        self.data_dir = os.path.abspath(data_dir)
        self.models_dir = os.path.join(self.data_dir, 'models')

    # --- reading ---------------------------------------------------------------------------
    def versions(self):
        """Complete versions, oldest first."""
        if not os.path.isdir(self.models_dir):
            return []
        found = [name for name in os.listdir(self.models_dir)
                 if _VERSION_RE.match(name) and os.path.isfile(
                     os.path.join(self.models_dir, name, 'card.yaml'))]
        return sorted(found, key=lambda name: int(_VERSION_RE.match(name).group(1)))

    def version_dir(self, version):
        path = os.path.join(self.models_dir, version)
        if not _VERSION_RE.match(str(version)) or not os.path.isdir(path):
            raise ModelFileError(f"model version '{version}' does not exist under {self.models_dir}; "
                                 f'versions: {self.versions() or "none (run `rko train` first)"}')
        return path

    def read_card(self, version):
        path = os.path.join(self.version_dir(version), 'card.yaml')
        try:
            with open(path) as f:
                card = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise ModelFileError(f'card {path} cannot be read: {exc}') from exc
        if not isinstance(card, dict):
            raise ModelFileError(f'card {path} is not a mapping; re-export the version')
        return card

    def active_version(self):
        """The live version, or None before the first model."""
        path = os.path.join(self.models_dir, 'active')
        try:
            with open(path) as f:
                version = f.read().strip()
        except FileNotFoundError:
            return None
        return version or None

    def newest_version(self):
        versions = self.versions()
        return versions[-1] if versions else None

    def previous_version(self, version):
        """The version the given one was trained from (its card's parent), else the one before it."""
        parent = self.read_card(version).get('parent')
        if parent and parent in self.versions():
            return parent
        versions = self.versions()
        index = versions.index(version) if version in versions else len(versions)
        return versions[index - 1] if index > 0 else None

    def load_policy(self, version=None):
        """The training-side DiffusionPolicy of a version (default: the active one)."""
        from rko_ros.policy.checkpoint import load_checkpoint
        version = version or self.active_version()
        if version is None:
            raise ModelFileError(f'no active model under {self.models_dir}; run `rko train` first')
        return load_checkpoint(os.path.join(self.version_dir(version), 'checkpoint.pt'))

    # --- writing ---------------------------------------------------------------------------
    def _next_number(self):
        numbers = [int(m.group(1)) for m in
                   (_VERSION_RE.match(n) for n in (os.listdir(self.models_dir)
                                                   if os.path.isdir(self.models_dir) else []))
                   if m]
        return max(numbers, default=0) + 1

    def write_version(self, policy, parent=None, method='pretrain', card_extra=None,
                      extra_files=None, activate=False):
        """Checkpoint + ONNX + card into a new version folder, atomically; returns its name.

        `extra_files`: {name: source_path} copied in as well (metrics CSV, plots).
        """
        from rko_ros.policy.checkpoint import save_checkpoint
        from rko_ros.policy.export import export_onnx, write_card
        os.makedirs(self.models_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix='.incoming-', dir=self.models_dir)
        try:
            save_checkpoint(os.path.join(tmp, 'checkpoint.pt'), policy)
            card = export_onnx(policy, os.path.join(tmp, 'policy.onnx'))
            for name, source in (extra_files or {}).items():
                shutil.copy2(source, os.path.join(tmp, name))
            # Claim the number last: two writers racing get distinct names via rename failing.
            for _ in range(100):
                version = f'v{self._next_number():04d}-{re.sub(r"[^A-Za-z0-9_.-]", "_", method)}'
                card.update({'version': version, 'parent': parent, 'method': method,
                             'created_unix_s': time.time(), **dict(card_extra or {})})
                write_card(os.path.join(tmp, 'card.yaml'), card)
                try:
                    os.rename(tmp, os.path.join(self.models_dir, version))
                    break
                except OSError:
                    continue
            else:
                raise ModelFileError(f'could not claim a version name under {self.models_dir}')
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            self.activate(version)
        return version

    def activate(self, version):
        self.version_dir(version)
        fd, tmp = tempfile.mkstemp(prefix='.active-', dir=self.models_dir)
        with os.fdopen(fd, 'w') as f:
            f.write(version + '\n')
        os.replace(tmp, os.path.join(self.models_dir, 'active'))

    def clean_incoming(self):
        """Remove temporary folders left by a killed writer (never a complete version)."""
        if os.path.isdir(self.models_dir):
            for name in os.listdir(self.models_dir):
                if name.startswith('.incoming-'):
                    shutil.rmtree(os.path.join(self.models_dir, name), ignore_errors=True)
