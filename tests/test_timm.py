"""timm backbones in `simcore train` / `simcore embed`, with the real timm.

timm imports torchvision, and this project's CPU torch pin (constraints.txt) has no torchvision
that imports beside it, so these tests run in their own environment: the README's
"Run the timm tests" command (.ci/timm_job), which pins a matching torch/torchvision pair
(constraints-timm.txt). In the main test run they are skipped with that reason; under
`pytest -m timm` (or SIMCORE_REQUIRE_TIMM=1) a timm that does not import is an error."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env

try:
    import timm
except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside timm
    if os.environ.get("SIMCORE_REQUIRE_TIMM"):
        raise
    pytest.skip(f"timm does not import here ({type(exc).__name__}); these tests run in .ci/timm_job",
                allow_module_level=True)

from test_data import write_photos  # noqa: E402
from simcore.isc.backbones import BackboneError, TimmBackbone, build_backbone  # noqa: E402
from simcore.isc.embed import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.timm
h5py = pytest.importorskip("h5py")


def cli(*args, cwd, **env):
    """``python -m simcore.isc.cli ARGS`` in a subprocess, with ``env`` added (HF_HOME, TORCH_HOME)."""
    return subprocess.run([sys.executable, "-m", "simcore.isc.cli", *map(str, args)], cwd=cwd,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=600)


@pytest.fixture
def caches(tmp_path):
    """Empty Hugging Face and torch.hub caches, so that nothing already downloaded is found."""
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}


def test_train_then_embed_with_a_timm_resnet18(tmp_path, caches):
    images = tmp_path / "images"
    write_photos(images, 10, size=48)
    run = tmp_path / "run"
    r = cli("train", images, "-o", run, "--backbone", "resnet18", "--dim", "32", "--image-size", "32",
            "--drip", "4,ALL", "--batch-size", "4,6", "--steps", "3,3", "--sample-rate", "1.0", "--views", "1",
            "--no-progress", cwd=tmp_path, **caches)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["backbone"]["name"] == "resnet18" and ckpt["head_classes"] == 10
    out = tmp_path / "d.h5"
    r = cli("embed", run / "final.pt", "--query", images, "--reference", images, "--train", images, "-o", out,
            "--no-progress", cwd=tmp_path, **caches)
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        q = f["query"][:]
    assert q.shape == (10, 32) and abs(float((q ** 2).sum(1).mean()) - 1.0) < 1e-4


def test_the_backbone_is_the_timm_feature_map_under_gem_and_a_linear():
    torch.manual_seed(0)
    m = build_backbone({"name": "resnet18", "dim": 8, "image_size": 32})
    assert isinstance(m, TimmBackbone) and m.fc.in_features == 512
    x = torch.rand(2, 3, 32, 32)
    f = m.body.forward_features((x - m.mean) / m.std).clamp_min(1e-6)
    expected = m.fc(f.pow(3).mean((2, 3)).pow(1 / 3))           # GeM with p = 3
    assert torch.equal(m(x), expected)
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        build_backbone({"name": "no_such_net", "dim": 8, "image_size": 32})


def test_pretrained_weights_come_only_from_this_machine(tmp_path, caches):
    """--pretrained with empty caches: a one-line error, no download. With the weights in the
    Hugging Face cache's layout: they are the ones loaded."""
    images = tmp_path / "images"
    write_photos(images, 4, size=40)
    args = ("train", images, "-o", tmp_path / "run", "--backbone", "resnet18", "--pretrained", "--dim", "8",
            "--image-size", "32", "--drip", "ALL", "--batch-size", "4", "--steps", "1", "--no-progress")
    r = cli(*args, cwd=tmp_path, **caches)
    assert r.returncode == 2 and "not on this machine" in r.stderr and "Traceback" not in r.stderr, r.stderr

    # Weights where an earlier download would have left them: HF_HOME/hub/models--timm--resnet18.a1_in1k/...
    from safetensors.torch import save_file
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    commit = "0" * 40
    cache = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    (cache / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(7)
    weights = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(weights, str(cache / "snapshots" / commit / "model.safetensors"))
    code = ("import sys, torch; from simcore.isc.backbones import build_backbone, local_pretrained_file; "
            "print(local_pretrained_file('resnet18')); "
            "m = build_backbone({'name': 'resnet18', 'dim': 8, 'image_size': 32}, pretrained=True); "
            "torch.save(m.body.state_dict(), sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "body.pt")], cwd=tmp_path,
                       env=subprocess_env(**caches), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(cache))
    body = torch.load(tmp_path / "body.pt")
    assert all(torch.equal(body[k], weights[k]) for k in body) and "conv1.weight" in body
    r = cli(*args, cwd=tmp_path, **caches)
    assert r.returncode == 0, r.stderr

