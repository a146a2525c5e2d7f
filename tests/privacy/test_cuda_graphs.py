"""CUDA graphs: refused clearly where they cannot run; on CPU, the wiring of both graphed steps with stand-ins for the
capture (a replay runs the captured function): equal to eager steps, captured again when the lr (a number) changes;
on a GPU (skipped without one), replays equal the eager steps, and every replay of the noisy step draws fresh secret
noise of std sigma C / B."""

import pytest
import torch
from oracle import dit_batch, tiny_dit

import dp_utils
from dp_utils.errors import UserError
from dp_utils.privacy import cuda_graphs

ROWS = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def private(model, noise_multiplier: float, cuda_graphs: bool, lr: float = 1e-3, optimizer=None, **kwargs):
    return dp_utils.make_private(
        module=model,
        optimizer=optimizer or torch.optim.AdamW(model.parameters(), lr=lr, fused=model.device.type == "cuda"),
        sample_rate=0.5,
        dataset_size=2 * ROWS,  # expected batch B = 4
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        cuda_graphs=cuda_graphs,
        **kwargs,
    )


def test_cuda_graphs_are_refused_without_cuda_or_with_opacus(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda_graphs needs a CUDA device"):
            private(tiny_dit(tmp_path), 1.0, cuda_graphs=True)
    with pytest.raises(UserError, match="cuda_graphs needs grad_sample_mode flash_bk or flash|needs a CUDA device"):
        private(tiny_dit(tmp_path), 1.0, cuda_graphs=True, grad_sample_mode="opacus_hooks")


def sgd_run(tmp_path, graphs: bool, noise_multiplier: float, rows_real: int, steps: int = 8):
    """SGD (its lr a number, baked into a graph) halved after step 5 by a schedule; the gradients after each step."""
    model = tiny_dit(tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, criterion, _ = private(model, noise_multiplier, graphs, optimizer=optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 5 else 0.5)
    x, t, y, noise = dit_batch(ROWS)
    mask = torch.arange(ROWS) < rows_real
    grads = []
    for _ in range(steps):
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask).backward()
        optimizer.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        schedule.step()
        optimizer.zero_grad()
    return model, optimizer, grads


def test_the_graphed_noisy_step_trains_as_the_eager_one_and_is_captured_again_when_the_lr_changes(
    tmp_path, cuda_graph_stand_ins
):
    eager, _, _ = sgd_run(tmp_path, graphs=False, noise_multiplier=0.0, rows_real=3)
    graphed, optimizer, _ = sgd_run(tmp_path, graphs=True, noise_multiplier=0.0, rows_real=3)
    assert isinstance(optimizer.graphed_step, cuda_graphs.GraphedNoisyStep)
    # steps 1-3 eager, 4 captured (lr 0.1), 5 replayed, 6 captured again (lr 0.05), 7 and 8 replayed
    assert cuda_graph_stand_ins == [optimizer.generator] * 2
    assert sum(steps for _, _, steps in optimizer.privacy_engine.accountant.history) == 8  # accounted once each
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_every_graphed_step_adds_noise_of_std_sigma_c_over_b_once(tmp_path, cuda_graph_stand_ins):
    _, optimizer, grads = sgd_run(tmp_path, graphs=True, noise_multiplier=2.0, rows_real=0)  # the sums are zero
    assert len(cuda_graph_stand_ins) == 2
    replays = grads[-4:]  # steps 5 to 8: graphed (stand-in)
    assert all(not torch.equal(a, b) for a, b in zip(replays, replays[1:], strict=False))
    values = torch.cat(replays).double()
    std, n = 2.0 * 1.0 / ROWS, values.numel()
    assert abs(values.std().item() - std) < 4 * std / (2 * n) ** 0.5


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_adam_gets_a_device_lr_that_a_schedule_fills_in_place(tmp_path):
    model = tiny_dit(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cuda_graphs.set_capturable(optimizer, True)
    group = optimizer.param_groups[0]
    lr = group["lr"]
    assert group["capturable"] and isinstance(lr, torch.Tensor) and lr.device == next(model.parameters()).device
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    before = cuda_graphs.hyperparameters(optimizer)
    schedule.step()
    assert group["lr"] is lr and lr.item() == pytest.approx(5e-4)  # the graph reads the new value
    assert cuda_graphs.hyperparameters(optimizer) == before  # no new capture needed
    group["lr"] = 1e-4  # e.g. a load_state_dict: a number again
    assert cuda_graphs.hyperparameters(optimizer) != before
    cuda_graphs.set_capturable(optimizer, True)
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(1e-4)


def test_gradient_checkpointing_is_refused_where_torch_cannot_capture_it(tmp_path, monkeypatch):
    model = tiny_dit(tmp_path)
    model.enable_gradient_checkpointing()
    monkeypatch.setattr(cuda_graphs, "check_cuda_device", lambda *args: None)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "register_generator_state", None, raising=False)  # CUDA builds have it
    monkeypatch.setattr(cuda_graphs, "CHECKPOINTING_CAPTURABLE", False)  # torch < 2.10
    with pytest.raises(UserError, match=r"gradient checkpointing needs torch >= 2.10 .*--no_cuda_graphs"):
        cuda_graphs.check_cuda_graphs(model, "flash_bk", None)
    monkeypatch.setattr(cuda_graphs, "CHECKPOINTING_CAPTURABLE", True)
    with pytest.raises(UserError, match="the model on the CUDA device"):  # the next check
        cuda_graphs.check_cuda_graphs(model, "flash_bk", None)


def test_a_graphed_step_refuses_what_it_cannot_capture(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CudaGraphedStep needs a CUDA device; on CPU call the physical step"):
            dp_utils.CudaGraphedStep(lambda x: x)
    monkeypatch.setattr(cuda_graphs, "check_cuda_device", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    with pytest.raises(UserError, match="takes the physical step function .* got int"):
        dp_utils.CudaGraphedStep(3)
    with pytest.raises(UserError, match=r"takes tensors only .* got \['Tensor', 'NoneType'\]"):
        dp_utils.CudaGraphedStep(lambda *inputs: None)(torch.zeros(2), None)


def test_a_graphed_step_must_return_the_private_criterions_loss(tmp_path, cuda_graph_stand_ins):
    model = tiny_dit(tmp_path)
    _, _, criterion, _ = private(model, 0.0, cuda_graphs=True)
    x, t, y, noise = dit_batch(ROWS)
    graphed = dp_utils.CudaGraphedStep(
        lambda x, t, y, noise: criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).losses
    )
    with pytest.raises(UserError, match="must return the private criterion's DPLoss .* not Tensor"):
        graphed(x, t, y, noise)


def train(tmp_path, graphs: bool, device: str, optimizer_class=torch.optim.AdamW, steps: int = 7) -> dict:
    """The parameters after `steps` steps on batches that differ from step to step (noise off)."""
    torch.manual_seed(0)
    model = tiny_dit(tmp_path).to(device)
    model, optimizer, criterion, _ = private(
        model, 0.0, graphs, optimizer=optimizer_class(model.parameters(), lr=1e-3)
    )
    batches = [tuple(b.to(device) for b in dit_batch(ROWS, seed=seed)) for seed in range(steps)]
    mask = torch.tensor([True, True, True, False], device=device)

    def physical_step(x, t, y, noise):
        with torch.autocast(device, enabled=False):
            return criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=mask)

    graphed = dp_utils.CudaGraphedStep(physical_step) if graphs else None
    for batch in batches:
        if graphed:
            graphed(*batch)
        else:
            physical_step(*batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    assert (graphed is None) or graphed.graph is not None  # captured after the warm-up
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_graphed_physical_steps_replay_new_batches_as_eager_steps_run_them(tmp_path, cuda_graph_stand_ins):
    """The static inputs, their copies and the replays."""
    eager = train(tmp_path, graphs=False, device="cpu", optimizer_class=torch.optim.SGD)
    graphed = train(tmp_path, graphs=True, device="cpu", optimizer_class=torch.optim.SGD)
    assert len(cuda_graph_stand_ins) == 2  # the physical step (after 3 calls) and the noisy step (after 3 steps)
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=0, atol=0, msg=name)


@cuda
def test_graphed_training_equals_eager_training(tmp_path):
    eager, graphed = train(tmp_path, graphs=False, device="cuda"), train(tmp_path, graphs=True, device="cuda")
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


@cuda
def test_every_replay_draws_fresh_noise_of_std_sigma_c_over_b(tmp_path):
    model = tiny_dit(tmp_path).cuda()
    model, optimizer, criterion, _ = private(model, 2.0, True, lr=0.0)
    x, t, y, noise = (b.cuda() for b in dit_batch(ROWS))
    padding = torch.zeros(ROWS, dtype=torch.bool, device="cuda")  # all rows padding: the sums are exactly zero
    draws = []
    for _ in range(8):
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise, mask=padding).backward()
        optimizer.step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        optimizer.zero_grad()
    assert optimizer.graphed_step.graph is not None  # the last steps were replays
    replays = draws[-4:]
    assert all(not torch.equal(a, b) for a, b in zip(replays, replays[1:], strict=False))
    values = torch.cat(replays).double()
    std, n = 2.0 * 1.0 / ROWS, values.numel()
    assert abs(values.std().item() - std) < 4 * std / (2 * n) ** 0.5
    assert abs(values.mean().item()) < 4 * std / n**0.5


def test_a_loaded_state_keeps_the_graphed_optimizer_capturable(tmp_path, cuda_graph_stand_ins):
    model = tiny_dit(tmp_path)
    model, optimizer, _, _ = private(model, 1.0, True, lr=1e-3)
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = 2e-3  # as saved by an eager run, or loaded onto another device
    optimizer.load_state_dict(state)
    lr = optimizer.param_groups[0]["lr"]
    assert (
        isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(2e-3) and optimizer.param_groups[0]["capturable"]
    )


def test_a_state_loaded_after_the_capture_is_captured_again(tmp_path, cuda_graph_stand_ins):
    """Loading replaces the optimizer's state tensors (Adam's moments), which the graph holds (SGD here: a capturable
    Adam cannot step on the CPU)."""
    model = tiny_dit(tmp_path)
    model, optimizer, criterion, _ = private(model, 1.0, True, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    x, t, y, noise = dit_batch(ROWS)
    for _ in range(5):
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(cuda_graph_stand_ins) == 1
    optimizer.load_state_dict(optimizer.state_dict())
    criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
    optimizer.step()
    assert len(cuda_graph_stand_ins) == 2


def test_a_state_saved_by_a_graphed_run_steps_in_an_eager_one(tmp_path):
    """A capturable AdamW cannot step on the CPU: the loaded flag and the tensor lr become the eager run's."""
    model = tiny_dit(tmp_path)
    model, optimizer, criterion, _ = private(model, 1.0, False, lr=1e-3)
    saved = optimizer.state_dict()
    saved["param_groups"][0].update(capturable=True, lr=torch.tensor(2e-3))
    optimizer.load_state_dict(saved)
    group = optimizer.param_groups[0]
    assert group["capturable"] is False and group["lr"] == pytest.approx(2e-3) and isinstance(group["lr"], float)
    x, t, y, noise = dit_batch(ROWS)
    criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
    optimizer.step()


@cuda
def test_a_state_saved_by_an_eager_run_is_captured_with_its_step_counters_on_the_device(tmp_path):
    """torch leaves a non-capturable Adam's step counters on the CPU, where a capturable one cannot step."""
    model = tiny_dit(tmp_path).cuda()
    model, optimizer, criterion, _ = private(model, 1.0, True, lr=1e-3)
    eager = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    eager.step()  # its state: step counters on the CPU
    optimizer.load_state_dict(eager.state_dict())
    assert all(s["step"].device.type == "cuda" for s in optimizer.state.values())
    x, t, y, noise = (b.cuda() for b in dit_batch(ROWS))
    for _ in range(5):  # 3 eager steps, the capture, a replay
        criterion(model(x, timestep=t, class_labels=y).sample[:, :4], noise).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_step_captured_again_every_time_warns_once(cuda_graph_stand_ins, recwarn):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    steps = []
    graphed = cuda_graphs.GraphedNoisyStep(lambda: steps.append(optimizer.param_groups[0]["lr"]), None, optimizer)
    calls = cuda_graphs.WARMUP_STEPS + 2 * cuda_graphs.RECAPTURE_WARNING
    for i in range(calls):
        optimizer.param_groups[0]["lr"] = 0.1 / (1 + i)  # a schedule that changes a number lr every step
        graphed()
    assert len(cuda_graph_stand_ins) == calls - cuda_graphs.WARMUP_STEPS and len(steps) == calls
    assert [str(w.message).split(":")[0] for w in recwarn] == [
        f"The optimizer's step was captured again in each of the last {cuda_graphs.RECAPTURE_WARNING} steps"
    ]
    recwarn.clear()
    for _ in range(calls):  # the lr stays as it was last captured: replays only
        graphed()
    assert len(cuda_graph_stand_ins) == calls - cuda_graphs.WARMUP_STEPS and not recwarn
