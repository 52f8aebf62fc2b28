"""Default layer pairings for the DC-CNN presets, layer channel inference, and the Distiller
that turns captured features into weighted KD terms."""

from __future__ import annotations

import copy
import math

import fastmri
import pytest
import torch
from fastmri.models import VarNet

from sftkd_fastmri.kd import FSP, AttentionTransfer, OutputImitation, available_losses
from sftkd_fastmri.kd.distiller import Distiller, check_loss_weights
from sftkd_fastmri.kd.hooks import FeatureCapture
from sftkd_fastmri.kd.pairings import (
    OUTPUT,
    cascade_map,
    default_pairings,
    layer_channels,
    resolve_pairings,
)
from sftkd_fastmri.models import create_model

H, W = 12, 10
LOSSES = ("at", "fitnet", "fsp", "sp", "cc", "imitation")
# every preset as a student, distilled from the D5C5 teacher of its family
PRESET_PAIRS = [
    ("dccnn_d3c5", "dccnn_d5c5"),
    ("dccnn_d5c5", "dccnn_d5c5"),
    ("dccnn_d3c5_paper", "dccnn_d5c5_paper"),
    ("dccnn_d5c5_paper", "dccnn_d5c5_paper"),
]


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, H, W, 2, generator=g)
    mask = torch.zeros(batch, 1, 1, W, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    return fastmri.fft2c(image) * mask, mask


def _pair(student_preset="dccnn_d3c5", teacher_preset="dccnn_d5c5", **overrides):
    torch.manual_seed(0)
    return create_model(student_preset, **overrides), create_model(teacher_preset, **overrides)


@pytest.mark.parametrize("student_preset, teacher_preset", PRESET_PAIRS)
def test_default_pairings_of_every_preset_give_matching_shapes(student_preset, teacher_preset):
    student, teacher = _pair(student_preset, teacher_preset)
    pairings = resolve_pairings(LOSSES, student, teacher)
    assert set(pairings) == set(LOSSES)
    kspace, mask = _inputs()
    s_layers = sorted({s for pairs in pairings.values() for s, _ in pairs})
    t_layers = sorted({t for pairs in pairings.values() for _, t in pairs})
    with torch.no_grad():
        with FeatureCapture(student, s_layers) as s_cap, FeatureCapture(teacher, t_layers) as t_cap:
            student(kspace, mask)
            teacher(kspace, mask)
            for s, t in pairings["at"]:  # AT: equal spatial sizes, 32-channel activations
                assert s_cap[s].shape[-2:] == t_cap[t].shape[-2:]
                assert s_cap[s].shape[1] == t_cap[t].shape[1] == 32
            fsp = pairings["fsp"]
            assert len(fsp) == 2 * 5
            for k in range(0, len(fsp), 2):  # FSP: 32 x 32 matrices for both networks
                g_s = FSP._gram(s_cap[fsp[k][0]], s_cap[fsp[k + 1][0]])
                g_t = FSP._gram(t_cap[fsp[k][1]], t_cap[fsp[k + 1][1]])
                assert g_s.shape == g_t.shape == (2, 32, 32)
            for loss in ("fitnet", "sp", "cc"):  # cascade outputs (B, C, H, W), same C
                for s, t in pairings[loss]:
                    assert s_cap[s].shape == t_cap[t].shape
                    assert s_cap[s].shape[1] == student.in_chans
    # every default pairing runs through its loss
    distiller = Distiller(student, teacher, dict.fromkeys(LOSSES, 1.0))
    with distiller, distiller.step():
        student(kspace, mask)
        terms = distiller().terms
    assert set(terms) == set(LOSSES)
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_documented_defaults_for_d5c5_teacher_and_d3c5_student():
    student, teacher = _pair()
    at = default_pairings("at", student, teacher)
    assert at == [(f"cascades.{i}.cnn.relu1", f"cascades.{i}.cnn.relu2") for i in range(5)]
    assert default_pairings("fitnet", student, teacher) == [("cascades.2", "cascades.2")]
    sp = [(f"cascades.{i}", f"cascades.{i}") for i in range(5)]
    assert default_pairings("sp", student, teacher) == sp
    assert default_pairings("cc", student, teacher) == sp
    assert default_pairings("fsp", student, teacher)[:2] == [
        ("cascades.0.cnn.relu0", "cascades.0.cnn.relu0"),
        ("cascades.0.cnn.relu1", "cascades.0.cnn.relu3"),
    ]
    assert default_pairings("imitation", student, teacher) == [(OUTPUT, OUTPUT)]


def test_cascade_counts_may_differ():
    assert cascade_map(5, 5) == [0, 1, 2, 3, 4]
    assert cascade_map(3, 5) == [1, 2, 4]
    assert cascade_map(5, 3) == [0, 0, 1, 1, 2]
    assert cascade_map(1, 4) == [3]
    torch.manual_seed(0)
    student = create_model("dccnn_d3c5", num_cascades=3, chans=8)
    teacher = create_model("dccnn_d5c5", chans=8)
    assert default_pairings("at", student, teacher)[-1] == (
        "cascades.2.cnn.relu1",
        "cascades.4.cnn.relu2",
    )
    assert default_pairings("fitnet", student, teacher) == [("cascades.1", "cascades.2")]
    with pytest.raises(ValueError, match=">= 1"):
        cascade_map(0, 5)


def test_explicit_layers_override_and_are_checked():
    student, teacher = _pair(chans=8)
    layers = {"at": [["cascades.0.cnn.relu0", "cascades.1.cnn.relu1"]]}  # lists, as from YAML
    resolved = resolve_pairings(["at", "sp"], student, teacher, layers)
    assert resolved["at"] == [("cascades.0.cnn.relu0", "cascades.1.cnn.relu1")]
    assert len(resolved["sp"]) == 5
    with pytest.raises(ValueError, match="not among the losses"):
        resolve_pairings(["at"], student, teacher, {"fsp": layers["at"]})
    with pytest.raises(ValueError, match="pair"):
        resolve_pairings(["at"], student, teacher, {"at": ["cascades.0"]})
    with pytest.raises(ValueError, match="non-empty"):
        resolve_pairings(["at"], student, teacher, {"at": []})
    with pytest.raises(KeyError, match="teacher DCCNN has no submodule 'cascades.9'"):
        resolve_pairings(["sp"], student, teacher, {"sp": [("cascades.0", "cascades.9")]})


def test_other_architectures_need_explicit_layers_except_imitation():
    varnet = VarNet(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2)
    student = create_model("dccnn_d3c5", chans=8)
    assert default_pairings("imitation", varnet, student) == [("", "")]
    with pytest.raises(ValueError, match=r"layers=\{'at'"):
        default_pairings("at", varnet, student)


def test_varnet_pairs_have_the_documented_defaults_and_they_run():
    from sftkd_fastmri.kd import check_distillation
    from sftkd_fastmri.kd.pairings import varnet_structure

    small = dict(sens_chans=2, sens_pools=1)
    teacher = create_model("varnet", num_cascades=4, chans=8, pools=3, **small)
    student = create_model("varnet", num_cascades=2, chans=4, pools=2, **small)
    raw = VarNet(num_cascades=2, chans=8, pools=3, **small)  # fastMRI's own, unprefixed
    assert varnet_structure(teacher) == ("varnet.", 4, 3)
    assert varnet_structure(raw) == ("", 2, 3)
    assert varnet_structure(torch.compile(student, backend="eager")) == ("varnet.", 2, 2)
    assert varnet_structure(create_model("dccnn_d3c5")) is None
    unet = "varnet.cascades.{}.model.unet"
    s0, s1, t1, t3 = unet.format(0), unet.format(1), unet.format(1), unet.format(3)
    assert default_pairings("at", student, teacher) == [  # 2 of 4 cascades: t(i) = 1, 3
        (f"{s0}.down_sample_layers.1", f"{t1}.down_sample_layers.1"),
        (f"{s1}.down_sample_layers.1", f"{t3}.down_sample_layers.1"),
    ]
    assert default_pairings("fitnet", student, teacher) == [(s1, t3)]
    assert default_pairings("sp", student, teacher) == [(s0, t1), (s1, t3)]
    assert default_pairings("fsp", student, teacher)[:2] == [
        (f"{s0}.down_sample_layers.0", f"{t1}.down_sample_layers.0"),
        (f"{s0}.up_conv.1.0", f"{t1}.up_conv.2.0"),
    ]
    one_pool = create_model("varnet", num_cascades=2, chans=4, pools=1, **small)
    assert default_pairings("at", one_pool, raw)[0] == (
        "varnet.cascades.0.model.unet.down_sample_layers.0",
        "cascades.0.model.unet.down_sample_layers.0",
    )
    # every default runs a step through its loss (FSP with equal chans; it refuses others)
    check_distillation(student, teacher, {k: 1.0 for k in ("at", "fitnet", "sp", "cc")})
    check_distillation(student, raw, {"at": 1.0, "sp": 1.0})
    wide = create_model("varnet", num_cascades=2, chans=8, pools=2, **small)
    check_distillation(wide, teacher, {"fsp": 1.0})
    with pytest.raises(ValueError, match="equal student and teacher FSP matrix shapes"):
        check_distillation(student, teacher, {"fsp": 1.0})


def test_layer_channels():
    student, teacher = _pair(chans=8)
    assert layer_channels(student, "cascades.0.cnn.conv0") == 8
    assert layer_channels(student, "cascades.0.cnn.relu1") == 8
    assert layer_channels(student, "cascades.0.cnn.conv2") == 2
    assert layer_channels(student, "cascades.3") == 2
    assert layer_channels(create_model("dccnn_d3c5_paper"), "cascades.3") == 1
    assert layer_channels(student, "") == 2
    varnet = VarNet(num_cascades=1, sens_chans=4, sens_pools=2, chans=4, pools=2)
    # LeakyReLU after InstanceNorm after the convolution of fastMRI's U-Net block
    assert layer_channels(varnet, "cascades.0.model.unet.conv.layers.2") == 16
    with pytest.raises(ValueError, match="cannot infer"):
        layer_channels(varnet, "cascades.0")
    with pytest.raises(KeyError):
        layer_channels(student, "cascades.0.cnn.relu5")


# -- Distiller ------------------------------------------------------------------------------
def test_distiller_equals_the_losses_on_manual_features():
    student, teacher = _pair(chans=8)
    kspace, mask = _inputs()
    weights = {"at": 0.5, "imitation": 2.0}
    distiller = Distiller(student, teacher, weights)
    assert list(distiller.parameters()) == []  # neither network is registered
    assert distiller.state_dict() == {}
    with distiller, distiller.step():
        out = student(kspace, mask)
        kd = distiller()
    s_layers = [s for s, _ in distiller.pairings["at"]]
    t_layers = [t for _, t in distiller.pairings["at"]]
    with FeatureCapture(student, s_layers) as s_cap, FeatureCapture(teacher, t_layers) as t_cap:
        out2 = student(kspace, mask)
        t_out = teacher(kspace, mask)
        at = AttentionTransfer()(s_cap.features(), t_cap.features())
    im = OutputImitation()([out2], [t_out])
    torch.testing.assert_close(kd.terms["at"], at)
    torch.testing.assert_close(kd.terms["imitation"], im)
    torch.testing.assert_close(kd.total, 0.5 * at + 2.0 * im)
    torch.testing.assert_close(kd.teacher_output, t_out)
    torch.testing.assert_close(out, out2)


def test_distiller_trains_student_and_regressors_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = create_model("dccnn_d3c5", chans=8), create_model("dccnn_d5c5", chans=16)
    teacher_state = copy.deepcopy(teacher.state_dict())
    layers = {"fitnet": [("cascades.2.cnn.relu1", "cascades.2.cnn.relu2")]}
    distiller = Distiller(
        student, teacher, {"fitnet": 1.0, "at": 1.0}, layers, {"at": {"squared": True}}
    )
    assert [n for n, _ in distiller.named_parameters()] == [
        "losses.fitnet.regressors.0.weight",
        "losses.fitnet.regressors.0.bias",
    ]
    assert distiller.losses["at"].squared
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    kspace, mask = _inputs()
    with distiller, distiller.step():
        out = student(kspace, mask)
        kd = distiller()
    (out.mean() + kd.total).backward()
    assert distiller.losses["fitnet"].regressors[0].weight.grad.abs().sum() > 0
    assert student.cascades[0].cnn.conv0.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k])


def test_teacher_summaries_give_the_raw_losses_and_drop_the_maps():
    """Summarised teacher features (reduced in the hooks) give the same terms and gradients as
    the full maps, and the full maps of summarised losses are not kept."""
    torch.manual_seed(0)
    student, teacher = _pair(chans=8)
    kspace, mask = _inputs(batch=3)
    weights = dict.fromkeys(LOSSES, 1.0)
    results = {}
    for summarize in (True, False):
        distiller = Distiller(student, teacher, weights, summarize_teacher=summarize)
        student.zero_grad()
        with distiller, distiller.step():
            out = student(kspace, mask)
            kd = distiller()
            stored = {
                layer: len(distiller._teacher_capture._outputs[layer])
                for layer in distiller.teacher_layers
            }
            (out.mean() + kd.total).backward()
        grads = [p.grad.clone() for p in student.parameters()]
        results[summarize] = (kd.terms, grads, stored, distiller)
    (terms_s, grads_s, stored_s, summarized), (terms_r, grads_r, stored_r, _) = (
        results[True],
        results[False],
    )
    for name in LOSSES:
        torch.testing.assert_close(terms_s[name], terms_r[name])
    for a, b in zip(grads_s, grads_r):
        torch.testing.assert_close(a, b)
    assert summarized._summarized == {"at", "fsp", "sp", "cc"}
    raw_layers = {t for n in ("fitnet", "imitation") for _, t in summarized.pairings[n]}
    assert {k for k, v in stored_s.items() if v} == raw_layers
    assert all(v == 1 for v in stored_r.values())


def test_teacher_summaries_need_one_teacher_run():
    student, teacher = _pair(chans=8)
    kspace, mask = _inputs()
    distiller = Distiller(student, teacher, {"at": 1.0})
    with distiller, distiller.step():
        student(kspace, mask)
        distiller.run_teacher()
        with distiller._teacher_capture.recording(clear=False), torch.no_grad():
            teacher(kspace, mask)  # a second teacher pass in the same step
        with pytest.raises(RuntimeError, match="ran 2 times"):
            distiller.compute_terms()


def test_distiller_guards():
    student, teacher = _pair(chans=8)
    kspace, mask = _inputs()
    distiller = Distiller(student, teacher, {"imitation": 1.0})
    with pytest.raises(RuntimeError, match="not attached"):
        distiller.begin_step()
    with distiller:
        with distiller.step():
            student(kspace, mask)
            student(kspace, mask)
            with pytest.raises(RuntimeError, match="ran 2 times"):
                distiller()
        teacher.train()
        with distiller.step(), pytest.warns(UserWarning, match="eval mode"):
            student(kspace, mask)
            distiller()
        assert not teacher.training
    assert not distiller.attached
    with pytest.raises(ValueError, match="different modules"):
        Distiller(student, student, {"imitation": 1.0})
    with pytest.raises(ValueError, match="loss_options given for"):
        Distiller(student, teacher, {"at": 1.0}, loss_options={"cc": {}})
    with pytest.raises(TypeError, match="unknown option"):
        Distiller(student, teacher, {"at": 1.0}, loss_options={"at": {"beta": 2}})
    wide = create_model("dccnn_d5c5", chans=16)
    with pytest.raises(ValueError, match="FSP matrices differ"):
        Distiller(student, wide, {"fsp": 1.0})
    with pytest.raises(ValueError, match="even number"):
        Distiller(student, teacher, {"fsp": 1.0}, {"fsp": [("cascades.0", "cascades.0")]})


def test_check_loss_weights():
    assert check_loss_weights({"at": 1, "sp": 0}) == {"at": 1.0, "sp": 0.0}
    with pytest.raises(ValueError, match="available: " + ", ".join(available_losses())):
        check_loss_weights({"attention": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        check_loss_weights({"at": -1.0})
    with pytest.raises(ValueError, match="finite"):
        check_loss_weights({"at": float("nan")})
    with pytest.raises(TypeError, match="number"):
        check_loss_weights({"at": "1"})
    with pytest.raises(TypeError, match="mapping"):
        check_loss_weights(["at"])
    with pytest.raises(ValueError, match="empty"):
        check_loss_weights({})


def test_compiled_networks_take_the_default_pairings_and_give_the_same_terms():
    """A ``torch.compile``'d student or teacher is paired by the names of the network it
    compiles (they were unknown: every layer needed an ``_orig_mod.`` prefix); terms and
    gradients equal those of the plain networks."""
    student, teacher = _pair(chans=8)
    kspace, mask = _inputs()
    weights = {"at": 1.0, "fsp": 1.0, "fitnet": 1.0, "imitation": 1.0}
    results = []
    for compiled in (None, "student", "teacher"):
        s = torch.compile(student, backend="eager") if compiled == "student" else student
        t = torch.compile(teacher, backend="eager") if compiled == "teacher" else teacher
        student.zero_grad()
        distiller = Distiller(s, t, weights)
        with distiller, distiller.step():
            out = s(kspace, mask)
            kd = distiller()
        (out.mean() + kd.total).backward()
        grad = student.cascades[1].cnn.conv0.weight.grad.clone()
        results.append((distiller.pairings, {k: v.detach() for k, v in kd.terms.items()}, grad))
    (pairings, terms, grad) = results[0]
    for other_pairings, other_terms, other_grad in results[1:]:
        assert other_pairings == pairings
        for name in weights:
            torch.testing.assert_close(other_terms[name], terms[name])
        torch.testing.assert_close(other_grad, grad)
    assert layer_channels(torch.compile(student, backend="eager"), "cascades.0.cnn.relu0") == 8
