"""The dual-sampling attention network (models/dsan.py): Eq. 1-5 against hand computations, the
sampler's frequencies, the stride change, and the ensemble through a bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestdx.models.dsan import (DIAGNOSIS, DSAN, DSANMethod, DualSamplingEnsemble, SizeBalancedSampler,
                                 attention_loss, attention_ratio, ensemble_weight, group_weights, size_groups,
                                 soft_mask)


def tiny() -> DSAN:
    torch.manual_seed(0)
    return DSAN(widen_factor=0.125)


def test_features_are_one_sixteenth_of_the_input_per_axis():
    net = tiny().eval()
    x = torch.rand(1, 1, 32, 48, 64)
    assert tuple(net.features(x).shape[2:]) == (2, 3, 4)
    out = net(x)
    assert out["attention"].shape == x.shape and out["logits"].shape == (1,)


def test_eq2_soft_mask_matches_a_hand_computation():
    a = torch.tensor([0.0, 1.0, 2.0, 4.0]).view(1, 1, 1, 1, 4)
    got = soft_mask(a, (1, 1, 4), alpha=100.0, beta=0.4).flatten().numpy()
    norm = np.array([0.0, 0.25, 0.5, 1.0])  # min-max normalised
    want = 1 / (1 + np.exp(-100 * (norm - 0.4)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_eq2_upsamples_to_the_input_size():
    a = torch.zeros(2, 1, 2, 2, 2)
    a[0, 0, 1, 1, 1] = 3.0
    t = soft_mask(a, (8, 8, 8))
    assert t.shape == (2, 1, 8, 8, 8)
    assert t[0, 0, -1, -1, -1] > 0.99 and t[0, 0, 0, 0, 0] < 0.01  # the hot corner stays hot


def test_eq3_attention_loss_matches_a_hand_computation():
    t = torch.tensor([[0.9, 0.1, 0.5, 0.0]]).view(1, 1, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).view(1, 1, 1, 2, 2)
    want = ((0.1 ** 2) + (0.1 ** 2) + (0.5 ** 2) + 0) / ((0.9 + 0.1 + 0.5) + 2.0)
    got = attention_loss(t, m, torch.tensor([True]))
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_attention_loss_is_zero_for_cap_cases_and_averages_the_covid_ones():
    torch.manual_seed(1)
    t, m = torch.rand(3, 1, 2, 4, 4), (torch.rand(3, 1, 2, 4, 4) > 0.5).float()
    assert float(attention_loss(t, m, torch.tensor([False, False, False]))) == 0.0
    one = attention_loss(t[1:2], m[1:2], torch.tensor([True]))
    mixed = attention_loss(t, m, torch.tensor([False, True, False]))
    assert float(mixed) == pytest.approx(float(one), rel=1e-6)


def _batch(net_input, covid):
    mask = torch.zeros_like(net_input)
    mask[..., 4:12, 4:12, 4:12] = 1
    covid = torch.tensor(covid, dtype=torch.float32)
    return {"image": net_input, "mask": mask, "targets": {"diagnosis": covid},
            "known": {"diagnosis": torch.ones_like(covid, dtype=torch.bool)}, "index": torch.arange(len(covid))}


def test_the_attention_kernel_is_the_fc_weight_and_l_ex_never_moves_it():
    net = tiny()
    method = DSANMethod([DIAGNOSIS], {"lr": 1e-3}, {"lambda_ex": 0.5})
    batch = _batch(torch.rand(2, 1, 16, 16, 16), [1, 0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = method.losses(net, batch, None)
    assert set(losses) >= {"loss", "loss_diagnosis", "loss_attention"}
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    # After a step, the 1x1x1 kernel is still exactly the (updated) FC weight.
    assert torch.equal(net.attention_kernel()[:, :, 0, 0, 0], net.fc.weight.detach())
    # L_ex alone gives the FC layer no gradient (only the BCE updates it), but reaches the features.
    net.zero_grad()
    attention_loss(net(batch["image"])["attention"], batch["mask"], torch.tensor([True, False])).backward()
    assert net.fc.weight.grad is None or float(net.fc.weight.grad.abs().sum()) == 0.0
    assert float(net.layer4[0].conv1.weight.grad.abs().sum()) > 0


def test_lambda_zero_trains_without_masks():
    method = DSANMethod([DIAGNOSIS], {"lr": 1e-3}, {"lambda_ex": 0.0})
    batch = _batch(torch.rand(2, 1, 16, 16, 16), [1, 0])
    del batch["mask"]
    losses = method.losses(tiny(), batch, None)
    assert "loss_attention" not in losses and torch.isfinite(losses["loss"])


def test_size_groups_and_the_papers_weights():
    ratios = np.array([0.01, 0.02, 0.05, 0.06, 0.07, 0.08, 0.0005, 0.0009, 0.001, 0.002])
    covid = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    groups = size_groups(ratios, covid)
    # COVID small < 0.030, large otherwise; CAP large > 0.001 (0.001 itself is small).
    assert groups.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3]
    np.testing.assert_allclose(group_weights(groups), [4 / 2, 1, 1, 3 / 1])


def test_sampler_group_frequencies_over_10000_draws_match_the_weights():
    rng = np.random.default_rng(0)
    covid = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    ratios = np.r_[rng.uniform(0.001, 0.029, 20), rng.uniform(0.031, 0.2, 40),  # covid: 20 small, 40 large
                   rng.uniform(0.0, 0.001, 45), rng.uniform(0.0011, 0.01, 15)]  # cap: 45 small, 15 large
    sampler = SizeBalancedSampler(ratios, covid, num_samples=10_000, generator=torch.Generator().manual_seed(0))
    expected = np.array([2.0, 1.0, 1.0, 3.0]) / 7.0
    np.testing.assert_allclose(sampler.probabilities, expected)
    drawn = sampler.groups[np.fromiter(iter(sampler), int)]
    freq = np.bincount(drawn, minlength=4) / 10_000
    # Binomial standard deviation at 10,000 draws is at most 0.005: 0.02 is four of them.
    np.testing.assert_allclose(freq, expected, atol=0.02)
    # Uniform within a group: every member of the smallest group is drawn.
    assert set(np.fromiter(iter(sampler), int)) >= set(np.flatnonzero(sampler.groups == 3))


@pytest.mark.parametrize("ratio,w", [(0.0, 0.35), (0.000999, 0.35), (0.001, 0.96), (0.0100, 0.96),
                                     (0.030, 0.96), (0.030001, 0.35), (0.5, 0.35)])
def test_the_ensemble_weight_switches_at_exactly_0001_and_0030(ratio, w):
    assert float(ensemble_weight(torch.tensor([ratio]))) == pytest.approx(w)


def test_dual_sampling_ensemble_is_eq5_and_estimates_the_ratio_from_attention():
    us, ss = tiny().eval(), DSAN(widen_factor=0.125).eval()
    ens = DualSamplingEnsemble([us, ss], [DIAGNOSIS]).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        p_us, p_ss = torch.sigmoid(us(x)["logits"]), torch.sigmoid(ss(x)["logits"])
        given = ens(x, ratio=torch.tensor([0.01, 0.2]))
        estimated = ens(x)
    want = torch.stack([0.96 * p_us[0] + 0.04 * p_ss[0], 0.35 * p_us[1] + 0.65 * p_ss[1]])
    torch.testing.assert_close(torch.sigmoid(given["logits"]), want, rtol=1e-4, atol=1e-5)
    assert given["ratio_from_attention"].tolist() == [0.0, 0.0]
    with torch.no_grad():
        ratio = attention_ratio(us(x)["attention"], x)
    torch.testing.assert_close(estimated["infection_ratio"], ratio)
    assert estimated["ratio_from_attention"].tolist() == [1.0, 1.0]


def test_attention_ratio_counts_attended_lung_voxels_only():
    x = torch.zeros(1, 1, 2, 2, 2)
    x[0, 0, 0] = 0.3  # four lung voxels (input > 0), four outside
    att = torch.zeros_like(x)
    att[0, 0, 0, 0, 0] = 0.9  # one attended lung voxel
    att[0, 0, 1] = 0.9  # attended, but outside the lungs
    assert float(attention_ratio(att, x)) == pytest.approx(0.25)


def test_dual_sampling_member_configs_and_rule():
    cfg = {"train": {"ensemble": 2}, "method": {"sampling": "dual"}}
    import copy

    members = [DSANMethod.member_config(copy.deepcopy(cfg), k) for k in range(2)]
    assert [m["method"]["sampling"] for m in members] == ["uniform", "size_balanced"]
    assert DSANMethod.ensemble_rule(cfg) == "dual_sampling"
    assert DSANMethod.ensemble_rule({"method": {"sampling": "uniform"}}) == "mean"
    from chestdx.errors import ChestDxError

    with pytest.raises(ChestDxError, match="train.ensemble: 2"):
        DSANMethod.member_config({"train": {"ensemble": 3}, "method": {"sampling": "dual"}}, 0)


def test_the_ensemble_rule_survives_a_bundle(tmp_path):
    from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
    from chestdx.train.config import load_config

    cfg = load_config("configs/dsan_ds.yaml", ["model.widen_factor=0.125", "preprocess.size=[16,16,16]"])
    members = [DSAN(widen_factor=0.125).eval() for _ in range(2)]
    ens = DualSamplingEnsemble(members, [DIAGNOSIS]).eval()
    path = save_bundle(make_bundle(ens, cfg), tmp_path / "model.pt")
    model, bundle = load_bundle(path)
    assert isinstance(model, DualSamplingEnsemble) and bundle["ensemble_rule"] == "dual_sampling"
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], ens(x)["logits"])
