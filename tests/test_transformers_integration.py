"""TempNet for transformers causal LMs: bounds, stop-gradient, Trainer, save/load, generate, loss switch."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from tempnet.integrations.transformers import (
    TempNetConfig,
    TempNetForCausalLM,
    tempered_causal_lm_loss,
    use_tempered_loss,
)

VOCAB = 61


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def wrapped(source: str = "logits", rho: float | None = 2.5, train_model: bool = True, seed: int = 0,
            **config) -> TempNetForCausalLM:
    head = TempNetConfig(source=source, width=16, tau_min=0.2, tau_max=3.0, rho=rho, backend="torch", **config)
    return TempNetForCausalLM(tiny_llama(seed), head, train_model=train_model)


def tokens(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_temperatures_stay_inside_bounds(source):
    model = wrapped(source)
    with torch.no_grad():
        model.model.lm_head.weight.mul_(1e4)  # extreme logits and hidden-state projections
        tau = model(input_ids=tokens()).temperatures
    assert tau.shape == (3, 12)
    assert bool(((tau > 0.2) & (tau < 3.0)).all())


@pytest.mark.parametrize("rho", [None, 2.5])
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_lm_gets_the_gradient_of_a_constant_tau(rho, source):
    model = wrapped(source, rho=rho)
    twin = copy.deepcopy(model.model)
    ids = tokens()
    labels = ids.clone()
    labels[0, :4] = -100
    output = model(input_ids=ids, labels=labels)
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tempnet.parameters())

    logits = twin(input_ids=ids).logits
    loss = tempered_causal_lm_loss(logits, labels, VOCAB, tau=output.temperatures.detach(), rho=rho, backend="torch")
    loss.backward()
    assert torch.allclose(loss, output.loss)
    for (name, p), q in zip(model.model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_lm_trains_only_the_head():
    model = wrapped(train_model=False)
    model(input_ids=tokens(), labels=tokens()).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters())
    assert all(p.grad is not None for p in model.tempnet.parameters())


def test_rho_at_or_above_log_v_is_refused():
    with pytest.raises(ValueError, match=r"rho=4\.2 must be below log V"):
        wrapped(rho=4.2)


class _Sequences(torch.utils.data.Dataset):
    """Learnable sequences: each row counts up from a random start modulo V."""

    def __init__(self, count: int = 32, length: int = 16) -> None:
        starts = torch.randint(1, VOCAB, (count, 1), generator=torch.Generator().manual_seed(3))
        self.ids = (starts + torch.arange(length)) % (VOCAB - 1) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.ids[index]}


def test_trainer_step_lowers_the_loss(tmp_path):
    model = wrapped()
    data = _Sequences()
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.3


@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_save_and_load_round_trip(tmp_path, source):
    model = wrapped(source).eval()
    with torch.no_grad():
        model.tempnet.output.bias.fill_(0.3)  # a non-initial value
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tempnet.safetensors").is_file() and (tmp_path / "tempnet_config.json").is_file()
    loaded = TempNetForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.tempnet_config == model.tempnet_config
    ids = tokens()
    with torch.no_grad():
        a, b = model(input_ids=ids), loaded(input_ids=ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.temperatures, b.temperatures)
    assert LlamaForCausalLM.from_pretrained(tmp_path).config.vocab_size == VOCAB  # the LM loads alone too


def _spread_temperatures(model: TempNetForCausalLM) -> None:
    """Sharpen the head's first layer and randomise its output weights so that τ varies between steps."""
    with torch.no_grad():
        model.tempnet.fc1.weight.mul_(30)
        model.tempnet.output.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(5)) * 10)


def _manual_generation(model: TempNetForCausalLM, prompt: torch.Tensor, steps: int, sample: bool):
    """Step-by-step decoding without cache: divide the last logits by the predicted τ, never end."""
    ids, taus = prompt, []
    for _ in range(steps):
        with torch.no_grad():
            output = model(input_ids=ids)
        tau = output.temperatures[:, -1]
        scores = output.logits[:, -1].float() / tau[:, None]
        scores[:, 0] = -torch.inf  # EOS (token 0) is banned, as generate's min_new_tokens does
        taus.append(tau)
        if sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
    return ids, torch.stack(taus, 1)


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_generate_divides_each_step_by_its_temperature(sample, source):
    model = wrapped(source, seed=4).eval()
    _spread_temperatures(model)
    prompt = tokens(batch=2, length=4)
    torch.manual_seed(7)
    expected, expected_tau = _manual_generation(model, prompt, 6, sample)
    torch.manual_seed(7)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=sample, **({"top_k": 0} if sample else {}), output_logits=True, output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert expected_tau.std() > 0.05
    for step in range(6):  # column 0 is the EOS token, masked by min_new_tokens
        torch.testing.assert_close(out.scores[step][:, 1:], out.logits[step][:, 1:] / expected_tau[:, step, None],
                                   rtol=1e-4, atol=1e-5)


def test_beam_search_scores_reflect_the_division():
    model = wrapped(seed=4).eval()
    _spread_temperatures(model)
    prompt = tokens(batch=1, length=4)
    options = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 4, "num_beams": 3,
               "output_scores": True, "output_logits": True, "return_dict_in_generate": True}
    tempered = model.generate(prompt, **options)
    plain = model.generate(prompt, use_tempnet=False, **options)
    with torch.no_grad():
        tau = model(input_ids=prompt).temperatures[0, -1]
    first_log_probs = torch.log_softmax(tempered.logits[0][0].float(), dim=-1)
    torch.testing.assert_close(tempered.scores[0][0], first_log_probs / tau, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.scores[0][0], first_log_probs, rtol=1e-4, atol=1e-5)
    assert tempered.sequences.shape == plain.sequences.shape


@pytest.mark.parametrize("num_items", [None, 17])
def test_use_tempered_loss_matches_the_models_own_loss(num_items):
    model = tiny_llama()
    ids = tokens()
    labels = ids.clone()
    labels[1, 5:] = -100
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    own = model(input_ids=ids, labels=labels, **kwargs).loss
    assert use_tempered_loss(model, backend="torch") is model
    tempered = model(input_ids=ids, labels=labels, **kwargs).loss
    torch.testing.assert_close(tempered, own, rtol=1e-5, atol=1e-6)
    use_tempered_loss(model, tau=2.0, backend="torch")
    assert not torch.allclose(model(input_ids=ids, labels=labels, **kwargs).loss, own)
