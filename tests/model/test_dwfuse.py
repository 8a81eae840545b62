"""DWFuse (Eq. 9-14) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from omnifuse_model.fusion import dwfuse_weights, modality_weights
from omnifuse_model.losses import true_label_probability
from omnifuse_model.model import OmniFuse


def test_three_modalities_by_hand():
    # beta / (M - 1) = 0.5 / 2 = 0.25, so omega_m = (prod over the other two of (1 - p))^0.25
    # omega_1 = (0.5 * 0.8)^0.25 = 0.4^0.25  = sqrt(0.6324555320) = 0.7952707288
    # omega_2 = (0.1 * 0.8)^0.25 = 0.08^0.25 = sqrt(0.2828427125) = 0.5318295897
    # omega_3 = (0.1 * 0.5)^0.25 = 0.05^0.25 = sqrt(0.2236067977) = 0.4728708045
    p = torch.tensor([[0.9, 0.5, 0.2]])
    expected = torch.tensor([[0.7952707288, 0.5318295897, 0.4728708045]])
    torch.testing.assert_close(dwfuse_weights(p, 0.5), expected)


@pytest.mark.parametrize(
    ("p", "beta", "expected"),
    [
        # M = 2: beta / (M - 1) = beta, omega_1 = (1 - p_2)^beta, omega_2 = (1 - p_1)^beta
        ([0.75, 0.36], 0.5, [0.8, 0.5]),  # sqrt(0.64), sqrt(0.25)
        ([0.3, 0.6], 1.0, [0.4, 0.7]),
        ([0.3, 0.6], 2.0, [0.16, 0.49]),
        ([0.3, 0.6], 0.0, [1.0, 1.0]),  # beta = 0 switches the down-weighting off
        ([0.0, 0.0], 0.5, [1.0, 1.0]),  # nobody is right: full weight everywhere
    ],
)
def test_two_modalities_by_hand(p, beta, expected):
    torch.testing.assert_close(dwfuse_weights(torch.tensor([p]), beta), torch.tensor([expected]))


def test_rows_are_independent_and_four_modalities():
    # M = 4, beta = 1.5: exponent 0.5.
    # row 1, p = [0, .5, .5, .5]: omega_1 = sqrt(.5^3) = 0.3535533906, the others sqrt(1 * .25)
    # row 2, p = [.2, .2, .2, .2]: every omega = sqrt(.8^3) = sqrt(0.512) = 0.7155417528
    p = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    expected = torch.tensor(
        [[0.3535533906, 0.5, 0.5, 0.5], [0.7155417528, 0.7155417528, 0.7155417528, 0.7155417528]]
    )
    torch.testing.assert_close(dwfuse_weights(p, 1.5), expected)


def test_a_certain_modality_silences_the_others_without_nan():
    # p_1 = 1: every product that contains (1 - p_1) is 0; omega_1 = (0.7 * 0.4)^0.25
    # = 0.28^0.25 = sqrt(0.5291502622) = 0.7274269785
    p = torch.tensor([[1.0, 0.3, 0.6], [1.0, 1.0, 1.0]])
    weights = dwfuse_weights(p, 0.5)
    assert torch.isfinite(weights).all()
    expected = torch.tensor([[0.7274269785, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("shape", [(3,), (4, 1), (2, 3, 1), (0,)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError, match="p_true"):
        dwfuse_weights(torch.full(shape, 0.5), 0.5)


LN2, LN3 = math.log(2.0), math.log(3.0)


def test_true_label_probability_binary():
    # sigmoid(0) = 0.5, sigmoid(ln 3) = 3 / 4; a 0 label takes 1 - 3/4
    logits = torch.tensor([[0.0], [LN3], [LN3]])
    labels = torch.tensor([[1.0], [1.0], [0.0]])
    expected = torch.tensor([0.5, 0.75, 0.25])
    torch.testing.assert_close(true_label_probability(logits, labels, "binary"), expected)


def test_true_label_probability_multilabel_is_the_mean_over_labels():
    # probabilities [3/4, 1/2, 1/4]
    # labels [1, 0, 0] -> [3/4, 1/2, 3/4], mean 2/3; labels [0, 1, 1] -> [1/4, 1/2, 1/4], mean 1/3
    logits = torch.tensor([[LN3, 0.0, -LN3], [LN3, 0.0, -LN3]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = torch.tensor([2.0 / 3.0, 1.0 / 3.0])
    torch.testing.assert_close(true_label_probability(logits, labels, "multilabel"), expected)


def test_true_label_probability_multiclass():
    # softmax([0, ln 2, ln 3]) = [1, 2, 3] / 6
    logits = torch.tensor([[0.0, LN2, LN3], [0.0, LN2, LN3]])
    labels = torch.tensor([2, 0])
    expected = torch.tensor([0.5, 1.0 / 6.0])
    torch.testing.assert_close(true_label_probability(logits, labels, "multiclass"), expected)


def _hand_ce_and_p(logits: torch.Tensor, labels: torch.Tensor, task: str):
    """Per-sample cross-entropy and true-label probability of one head, written out."""
    if task == "multiclass":
        log_probs = logits - logits.exp().sum(dim=1, keepdim=True).log()
        true_log = log_probs[torch.arange(len(labels)), labels]
        return -true_log, true_log.exp()
    probs = 1.0 / (1.0 + torch.exp(-logits))
    ce = -(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean(dim=1)
    p = (labels * probs + (1 - labels) * (1 - probs)).mean(dim=1)
    return ce, p


def _hand_per_label_bce_and_p(logits: torch.Tensor, labels: torch.Tensor):
    """Multi-label, per head and label: BCE and the probability of the true value,
    [B, M, C] each, from logits [B, M, C] and labels [B, C]."""
    probs = 1.0 / (1.0 + torch.exp(-logits))
    y = labels.unsqueeze(1)
    bce = -(y * probs.log() + (1 - y) * (1 - probs).log())
    return bce, y * probs + (1 - y) * (1 - probs)


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_model_losses_follow_eq_12_to_14(make_config, make_batch, all_patterns, task):
    torch.manual_seed(0)
    config = make_config(
        3, task, alpha=0.25, beta=0.7, lambda1=0.3, lambda2=2.0, lambda3=0.4, use_tla=False
    )
    model = OmniFuse(config).eval()
    batch = make_batch(config, all_patterns(3), seed=1)

    output = model(**batch.forward_kwargs())

    num_modalities = config.num_modalities
    ce, p = zip(
        *(
            _hand_ce_and_p(output.modality_logits[:, m], batch.labels, task)
            for m in range(num_modalities)
        ),
        strict=True,
    )
    ce, p = torch.stack(ce, dim=1), torch.stack(p, dim=1)  # [B, M]
    if task == "multilabel":  # omega per label (Eq. 10 on each label), L_ens label by label
        ce, p = _hand_per_label_bce_and_p(output.modality_logits, batch.labels)  # [B, M, C]
    # Eq. 10 written as a loop over modalities
    omega = torch.stack(
        [
            torch.prod(1 - p[:, [n for n in range(num_modalities) if n != m]], dim=1)
            ** (0.7 / (num_modalities - 1))
            for m in range(num_modalities)
        ],
        dim=1,
    )
    if task == "multilabel":
        torch.testing.assert_close(output.dwfuse_label_weights, omega)
        l_ens = sum((omega[:, m] * ce[:, m]).mean() for m in range(num_modalities))
        omega = omega.mean(dim=2)  # the reported [B, M]: mean over labels
    else:
        assert output.dwfuse_label_weights is None
        l_ens = sum((omega[:, m] * ce[:, m]).mean() for m in range(num_modalities))
    torch.testing.assert_close(output.dwfuse_weights, omega)
    torch.testing.assert_close(output.losses["ens"], l_ens)
    l_rs, _ = _hand_ce_and_p(output.logits, batch.labels, task)
    torch.testing.assert_close(output.losses["rs"], l_rs.mean())
    torch.testing.assert_close(output.losses["fusion"], l_ens + 0.25 * l_rs.mean())
    losses = output.losses
    total = losses["forward"] + 0.3 * losses["backward"] + 2.0 * losses["fusion"]
    torch.testing.assert_close(losses["total"], total)


def test_weights_do_not_carry_gradient(make_config, make_batch, all_patterns):
    """omega is built from detached probabilities: L_ens trains the heads, not omega."""
    torch.manual_seed(0)
    config = make_config(2)
    model = OmniFuse(config)
    output = model(**make_batch(config, all_patterns(2)).forward_kwargs())
    assert not output.dwfuse_weights.requires_grad
    assert output.losses["ens"].requires_grad


# p = [0.9, 0.5, 0.2] -> (1 - p) = [0.1, 0.5, 0.8], beta = 0.5. omega_m is the product of the
# factors of the OTHER modalities that enter, to the power beta / K_m (K_m: how many enter);
# omega_m = 1 when none enters.
#   K = 2: exponent 0.25; K = 1: exponent 0.5.
#   0.4^0.25 = 0.7952707288, 0.08^0.25 = 0.5318295897, 0.05^0.25 = 0.4728708045
#   0.5^0.5 = 0.7071067812, 0.1^0.5 = 0.3162277660, 0.8^0.5 = 0.8944271910
_A, _B, _C = 0.7952707288, 0.5318295897, 0.4728708045
_HALF, _TENTH, _EIGHT = 0.7071067812, 0.3162277660, 0.8944271910
_EVERY_PATTERN_BY_HAND = [
    # (enters, expected omega)
    ((True, True, True), (_A, _B, _C)),  # the paper's Eq. 10
    ((True, True, False), (_HALF, _TENTH, _C)),  # omega_1 = 0.5^0.5, omega_2 = 0.1^0.5
    ((True, False, True), (_EIGHT, _B, _TENTH)),  # omega_1 = 0.8^0.5, omega_3 = 0.1^0.5
    ((False, True, True), (_A, _EIGHT, _HALF)),  # omega_2 = 0.8^0.5, omega_3 = 0.5^0.5
    ((True, False, False), (1.0, _TENTH, _TENTH)),  # nobody else enters for modality 1
    ((False, True, False), (_HALF, 1.0, _HALF)),
    ((False, False, True), (_EIGHT, _EIGHT, 1.0)),
    ((False, False, False), (1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize(("enters", "expected"), _EVERY_PATTERN_BY_HAND)
def test_left_out_modalities_do_not_enter_the_product_by_hand(enters, expected):
    p = torch.tensor([[0.9, 0.5, 0.2]])
    weights = dwfuse_weights(p, 0.5, torch.tensor([enters]))
    torch.testing.assert_close(weights, torch.tensor([expected]))


def test_every_pattern_at_once_rows_independent():
    p = torch.tensor([[0.9, 0.5, 0.2]]).expand(len(_EVERY_PATTERN_BY_HAND), -1)
    enters = torch.tensor([row[0] for row in _EVERY_PATTERN_BY_HAND])
    expected = torch.tensor([row[1] for row in _EVERY_PATTERN_BY_HAND])
    torch.testing.assert_close(dwfuse_weights(p, 0.5, enters), expected)
    # every modality entering is the unmasked formula
    torch.testing.assert_close(
        dwfuse_weights(p, 0.5, torch.ones_like(enters)), dwfuse_weights(p, 0.5)
    )


def test_enters_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"enters must be \[B, M\]"):
        dwfuse_weights(torch.rand(2, 3), 0.5, torch.ones(2, 2, dtype=torch.bool))


def _perturb_head(model: OmniFuse, m: int) -> None:
    with torch.no_grad():
        model.heads.modality_heads[m][-1].bias.add_(3.0)


@pytest.mark.parametrize("with_labels", [True, False])
def test_without_imputation_an_absent_modality_does_not_move_the_others_weights(
    make_config, make_batch, all_patterns, with_labels
):
    """Forward imputation off: the head of an absent modality saw only the placeholder; its
    prediction must not change the other modalities' omega (nor, hidden by dropping)."""
    torch.manual_seed(0)
    config = make_config(3, use_forward_imputation=False, use_backward_imputation=False)
    model = OmniFuse(config).eval()
    patterns = all_patterns(3)[1:]  # every non-empty pattern
    batch = make_batch(config, patterns, seed=2)
    kwargs = batch.forward_kwargs() if with_labels else {**batch.forward_kwargs(), "labels": None}
    before = model(**kwargs).dwfuse_weights
    _perturb_head(model, 2)  # modality 3's head now predicts something else entirely
    after = model(**kwargs).dwfuse_weights
    absent = ~patterns[:, 2]
    # samples lacking modality 3: nobody's weight moves (omega_3 never holds its own factor)
    torch.testing.assert_close(after[absent], before[absent])
    # samples holding it: the others' weights do move (it enters their products)
    assert not torch.allclose(after[~absent][:, :2], before[~absent][:, :2])


def test_with_imputation_an_imputed_modality_enters_the_others_weights(
    make_config, make_batch, all_patterns
):
    torch.manual_seed(0)
    model = OmniFuse(make_config(3)).eval()
    patterns = all_patterns(3)[1:]
    batch = make_batch(model.config, patterns, seed=2)
    before = model(**batch.forward_kwargs()).dwfuse_weights
    _perturb_head(model, 2)
    after = model(**batch.forward_kwargs()).dwfuse_weights
    absent = ~patterns[:, 2]
    assert not torch.allclose(after[absent][:, :2], before[absent][:, :2])


def test_multilabel_omega_is_per_label_and_tells_samples_apart():
    """Two samples whose heads have the same mean true-label probability over labels but
    fail on different labels: a mean of p over labels gives them the same omega; per label
    they differ, and each label's weight follows the other head on that label alone.

    M = 2, beta = 1 (exponent 1): omega_{1,c} = 1 - p_{2,c}, omega_{2,c} = 1 - p_{1,c}.
    Head 1 gives the truth 0.9 on both labels of both samples; head 2 gives (0.9, 0.1) to
    sample 1 and (0.5, 0.5) to sample 2: mean p 0.5 for both samples.
    Sample 1: omega_1 = (0.1, 0.9), mean 0.5; sample 2: omega_1 = (0.5, 0.5), mean 0.5;
    omega_2 = (0.1, 0.1) in both.
    """
    logit = math.log(9.0)  # sigmoid = 0.9
    labels = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    logits = torch.tensor(
        [
            [[logit, logit], [logit, -logit]],  # head 1 right; head 2 right on label 1 only
            [[logit, logit], [0.0, 0.0]],  # head 2 undecided on both labels
        ]
    )  # [B, M, C]
    weights, per_label = modality_weights(logits, labels, "multilabel", 1.0)
    torch.testing.assert_close(
        per_label, torch.tensor([[[0.1, 0.9], [0.1, 0.1]], [[0.5, 0.5], [0.1, 0.1]]])
    )
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.1], [0.5, 0.1]]))
    # without labels: each label's confidence max(p, 1 - p) stands in, per label too
    _, unlabelled = modality_weights(logits, None, "multilabel", 1.0)
    torch.testing.assert_close(unlabelled[:, 0], torch.tensor([[0.1, 0.1], [0.5, 0.5]]))


def test_multilabel_per_label_weights_respect_left_out_modalities():
    # M = 3, one label, modality 3 left out: omega_1 = (1 - p_2)^beta, as in the binary case
    logits = torch.tensor([[[0.0], [math.log(3.0)], [5.0]]])  # p = 0.5, 0.75, ~1 (label 1)
    labels = torch.tensor([[1.0]])
    enters = torch.tensor([[True, True, False]])
    weights, _ = modality_weights(logits, labels, "multilabel", 0.5, enters)
    binary, _ = modality_weights(logits, labels, "binary", 0.5, enters)
    torch.testing.assert_close(weights, binary)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5**0.5, (0.5 * 0.25) ** 0.25]]))
