import pytest
import torch
import torchvision

from carlzoo.model import CARLModel, ModelConfig, Prototypes, build_model
from carlzoo.training.loss import CARLLoss


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"width": 4, "num_prototypes": 10, **kw})


def test_output_shapes_cifar_stem():
    model = build_model(tiny())
    out = model(torch.randn(3, 3, 32, 32))
    assert out.features.shape == (3, 32)  # width 4 * 8, BasicBlock
    assert out.projection.shape == (3, 128)
    assert out.logits.shape == (3, 10)


def test_resnet50_imagenet_stem_matches_torchvision_parameters():
    model = build_model(ModelConfig(backbone="resnet50", stem="imagenet"))
    ref = torchvision.models.resnet50()
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert set(model.backbone.state_dict()) == set(ref_state)
    model.backbone.load_state_dict(ref_state)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    torch.testing.assert_close(model.forward_features(x), ref(x))
    assert model.num_features == 2048


def test_cifar_stem_keeps_resolution_imagenet_stem_reduces_it():
    cifar = build_model(tiny(stem="cifar")).backbone
    imnet = build_model(tiny(stem="imagenet")).backbone
    x = torch.randn(1, 3, 32, 32)
    assert cifar.maxpool(cifar.conv1(x)).shape[-1] == 32
    assert imnet.maxpool(imnet.conv1(x)).shape[-1] == 8


def test_methods_compose_to_forward():
    model = build_model(tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    f = model.forward_features(x)
    z = model.forward_head(f)
    out = model(x)
    torch.testing.assert_close(out.features, f)
    torch.testing.assert_close(out.projection, z)
    torch.testing.assert_close(out.logits, model.prototype_logits(z))


def test_cosine_logits_are_bounded_by_inverse_temperature():
    protos = Prototypes(8, 5, logits="cosine", temperature=0.1)
    logits = protos(torch.randn(20, 8) * 100)
    assert logits.abs().max() <= 10.0 + 1e-4
    # Scale of z does not matter for cosine logits.
    z = torch.randn(3, 8)
    torch.testing.assert_close(protos(z), protos(7 * z))


def test_dot_logits_are_the_paper_literal_form():
    protos = Prototypes(8, 5, logits="dot")
    z = torch.randn(3, 8)
    torch.testing.assert_close(protos(z), z @ protos.weight.T)


def test_every_trainable_parameter_gets_a_gradient():
    model = build_model(tiny())
    logits = model(torch.randn(8, 3, 16, 16)).logits
    CARLLoss()(logits[:4], logits[4:], 2.0).total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    zero = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert not zero


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "vgg"}, "model.backbone"),
        ({"stem": "tiny"}, "model.stem"),
        ({"logits": "cos"}, "model.logits"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_prototypes": 1}, "num_prototypes"),
    ],
)
def test_bad_model_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_key():
    cfg = tiny(temperature=0.2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"widht": 3})
    assert isinstance(build_model(cfg.to_dict()), CARLModel)


@pytest.mark.parametrize("field", ["width", "proj_hidden_dim", "proj_dim", "num_prototypes"])
@pytest.mark.parametrize("value", [8.0, 10.5, True, "8"])
def test_non_integer_sizes_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^model\.{field} must be an integer, got {value!r}"):
        ModelConfig(**{field: value})
