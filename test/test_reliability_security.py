"""Security: no unpickling of untrusted files, no network at runtime for local/random weights,
save_map writes confined to output_dir (end to end through the node's service)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vggt4d_ros"
GOLDEN = Path(os.environ.get("VGGT4D_GOLDEN", ROOT.parent / "shared" / "golden"))


def _calls(tree: ast.AST):
    """(dotted name, ast.Call) of every call in ``tree`` whose callee is a plain name or a
    dotted attribute chain (``x().eval()`` is not ``eval``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
                yield ".".join(reversed(parts)), node


def _kwarg_dicts(tree: ast.AST) -> dict[str, dict]:
    """``name = dict(k=const, ...)`` assignments (for ``f(**name)`` calls)."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Name) and node.value.func.id == "dict":
            for t in node.targets:
                if isinstance(t, ast.Name):
                    found[t.id] = {k.arg: getattr(k.value, "value", "<expr>")
                                   for k in node.value.keywords if k.arg}
    return found


def _kw(call: ast.Call, name: str, dicts: dict | None = None):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
        if k.arg is None and isinstance(k.value, ast.Name) and dicts and \
                name in dicts.get(k.value.id, {}):
            return dicts[k.value.id][name]
    return None


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every deserialisation call in ``source`` that may run code from a file."""
    bad = []
    tree = ast.parse(source, filename)
    dicts = _kwarg_dicts(tree)
    for name, call in _calls(tree):
        where = f"{filename}:{call.lineno} {name}"
        last = name.rsplit(".", 1)[-1]
        if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.", "shelve.",
                            "marshal.")) and last in ("load", "loads", "Unpickler", "open"):
            bad.append(where)
        elif last == "Unpickler":
            bad.append(where)
        elif name == "torch.load" and _kw(call, "weights_only", dicts) is not True:
            bad.append(f"{where} without weights_only=True")
        elif name.endswith("np.load") or name == "numpy.load":
            if _kw(call, "allow_pickle") not in (None, False):
                bad.append(f"{where} with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all") and _kw(call, "Loader") is None:
            bad.append(f"{where} without a safe Loader")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "eval", "exec"):
            bad.append(where)
    return bad


def test_no_unsafe_deserialisation_in_the_package():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30
    bad = [b for f in files for b in unsafe_loads(f.read_text(), str(f.relative_to(ROOT)))]
    assert not bad, "unsafe loads:\n" + "\n".join(bad)
    # the scanner itself catches each pattern
    for src in ("import pickle\npickle.load(open('x','rb'))", "torch.load('x')",
                "torch.load('x', weights_only=False)", "np.load('x', allow_pickle=True)",
                "yaml.load(s)", "pickle.loads(b)", "eval(s)"):
        assert unsafe_loads(src), src
    assert not unsafe_loads("torch.load('x', map_location='cpu', weights_only=True)")


def test_pickled_checkpoint_with_code_is_refused(tmp_path):
    """A .pt whose pickle would run code is refused (weights_only) and the code never runs."""
    from vggt4d_ros.model.checkpoint import CheckpointError, read_state_dict
    marker = tmp_path / "pwned"
    payload = (
        "import os, pickle\n"
        "class E:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"pickle.dump({{'w': E()}}, open('{tmp_path / 'evil.pt'}', 'wb'))\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    with pytest.raises(CheckpointError, match="refusing to unpickle|weights_only|cannot"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


_OFFLINE_SCRIPT = r"""
import os, socket, sys
os.environ["HF_HUB_OFFLINE"] = "1"
def refuse(*a, **k):
    raise AssertionError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.socket.sendto = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import numpy as np
from vggt4d_ros.stream.engine import FrameInput, StreamConfig, StreamEngine
from vggt4d_ros.stream.factory import PredictorConfig, build_predictor
pred = build_predictor(PredictorConfig(checkpoint="random_tiny", device="cpu", image_width=56))
eng = StreamEngine(pred, StreamConfig(window_size=4, stride=2))
rng = np.random.default_rng(0)
outs = []
for i in range(6):
    outs += eng.push(FrameInput(i * 33_000_000, rng.integers(0, 255, (42, 56, 3), np.uint8)))
assert len(outs) == 6, len(outs)
golden = sys.argv[1]
if os.path.isfile(os.path.join(golden, "vggt", "weights.safetensors")):
    from vggt4d_ros.model.checkpoint import load_vggt
    from vggt4d_ros.model.config import VGGTConfig
    load_vggt(os.path.join(golden, "vggt", "weights.safetensors"),
              config=VGGTConfig.from_json(os.path.join(golden, "vggt", "config.json")))
    print("LOCAL_CHECKPOINT_LOADED")
print("HUB_IMPORTED" if "huggingface_hub" in sys.modules else "HUB_NOT_IMPORTED")
"""


def test_no_network_for_random_or_local_weights():
    """Build + run a window with sockets disabled; huggingface_hub is never even imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(GOLDEN)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HUB_NOT_IMPORTED" in res.stdout, res.stdout
    if (GOLDEN / "vggt" / "weights.safetensors").is_file():
        assert "LOCAL_CHECKPOINT_LOADED" in res.stdout


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    """Only a hub id may reach the network; offline it fails fast with what to do."""
    from vggt4d_ros.model.checkpoint import CheckpointError, resolve_checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline|Download"):
        resolve_checkpoint("someone/some-model", cache_dir=tmp_path)
    # a path-looking source never goes to the hub
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope.safetensors"))


# ---------------------------------------------------------------------------- save_map paths
rclpy = pytest.importorskip("rclpy")


@pytest.mark.ros
@pytest.mark.parametrize("case", ["tum_symlink_out", "dangling_symlink_out",
                                  "symlinked_subdir_root_ok"])
def test_save_map_paths_confined_end_to_end(tmp_path, case):
    from reliability_harness import NodeHarness, synth_frames, wait_for
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    if case == "symlinked_subdir_root_ok":
        # output_dir itself may be a symlink (the operator's choice): files land in its target
        real = tmp_path / "real_out"
        real.mkdir()
        out.symlink_to(real)
    else:
        out.mkdir()
    if case == "tum_symlink_out":
        (out / "trajectory.tum").symlink_to(outside / "stolen.tum")
    elif case == "dangling_symlink_out":
        (out / "static_map.ply").symlink_to(outside / "nothing_here" / "x.ply")
    h = NodeHarness({"output_dir": str(out)}, namespace=f"/sec_{case}")
    try:
        for img, stamp in synth_frames(6):
            h.send(img, stamp)
        assert wait_for(lambda: len(h.odoms()) >= 6)
        res = h.call("save_map")
    finally:
        h.close()
    if case == "symlinked_subdir_root_ok":
        assert res.success, res.message
        assert (tmp_path / "real_out" / "static_map.ply").is_file()
    else:
        assert not res.success and "outside output_dir" in res.message
        assert list(outside.rglob("*")) == []          # nothing written outside
        assert not (out / "static_map.ply").is_file() or case == "dangling_symlink_out"
        if case == "tum_symlink_out":                  # checked BEFORE anything is written
            assert not (out / "static_map.ply").exists()
