"""simcore.isc.export: backbone + embedding layer + L2 to ONNX (run by onnxruntime on the CPU) and to a
torch.export archive, compared with the PyTorch model at several batch sizes."""
import numpy as np
import pytest
import torch

from simcore.isc.backbones import backbone_spec, build_backbone
from simcore.isc.export import EmbeddingModel, export_model, load_exported_program


@pytest.mark.parametrize("name, size", [("mobilefacenet", 32)])
def test_onnx_export_matches_pytorch(tmp_path, name, size, seed):
    import onnxruntime as ort
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_spec(name, 64, size))
    path = export_model(backbone, tmp_path / "model.onnx", image_size=size)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    model = EmbeddingModel(backbone).eval()
    g = torch.Generator().manual_seed(seed)
    for batch in (1, 7):                                   # the batch axis is dynamic
        x = torch.rand(batch, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(["embeddings"], {"images": x.numpy()})[0]
        assert out.shape == (batch, 64)
        assert np.abs(out - ref).max() <= 1e-5
        assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_torch_export_round_trip(tmp_path, seed):
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_spec("iresnet18", 32, 32))
    export_model(backbone, tmp_path / "model.pt2", image_size=32, format="torch.export")
    loaded = load_exported_program(tmp_path / "model.pt2")
    model = EmbeddingModel(backbone).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(backbone, tmp_path / "m.x", image_size=32, format="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]       # no temporary file left
