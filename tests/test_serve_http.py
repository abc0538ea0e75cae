"""``retro-compile serve`` (transformers serve over retro_compile'd models) over HTTP on the CPU:
several clients at once, against transformers serve of the untouched model."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from retro_compile import RetroConfig
from retro_compile.data import load_model
from retro_compile.serve import config_of, parse_args, server

QUESTIONS = ("Count from one to five.", "Name three colours.", "What is the capital of France?",
             "Write a haiku about the sea.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=5).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ask_all(port: int, model: str) -> list[str]:
    """Every question at once, one client thread each, greedy; the answers in order."""
    answers: list[str | None] = [None] * len(QUESTIONS)

    def ask(i: int) -> None:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTIONS[i]}],
                           "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://localhost:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        answers[i] = json.loads(urllib.request.urlopen(request, timeout=300).read())["choices"][0]["message"]["content"]

    clients = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=300)
    assert all(a for a in answers), answers
    return answers


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct (its real weights and chat template) as a folder transformers serve loads."""
    model, tokenizer = load_model("smollm2")
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_concurrent_clients_get_the_untouched_servers_answers(model_folder):
    """Four clients at once, each answered as transformers serve answers them with the untouched
    model (a budget covering every context); the server's model is the retro_compile'd one."""
    options = dict(host="localhost", device="cpu", dtype="float32", log_level="error")
    config = RetroConfig(mode="retro", budget=512, max_context=512)
    retro_port = free_port()
    retro = server(model_folder, config, background=True, port=retro_port, **options)
    try:
        wait_until_up(retro_port)
        served = ask_all(retro_port, model_folder)
        (loaded,) = retro._model_manager.loaded_models.values()
        assert loaded.model.retro_config == config
        manager = retro._generation_state._cb_manager._cb  # the continuous batching that answered
        assert type(manager).__name__ == "RetroBatchingManager" and manager.retro_states.config == config
    finally:
        retro.kill_server()

    from transformers.cli.serve import Serve

    stock_port = free_port()
    stock = Serve(force_model=model_folder, continuous_batching=True, non_blocking=True, port=stock_port, **options)
    try:
        wait_until_up(stock_port)
        assert served == ask_all(stock_port, model_folder)
    finally:
        stock.kill_server()


def test_the_command_line_builds_the_config():
    args = parse_args(["some/model", "--mode", "quest", "--budget", "1024", "--max-context", "4096", "--port", "9000"])
    assert (args.model, args.port) == ("some/model", 9000)
    assert config_of(args) == RetroConfig(mode="quest", budget=1024, max_context=4096)
    assert config_of(parse_args(["--budget", "0.15"])).budget == 0.15
