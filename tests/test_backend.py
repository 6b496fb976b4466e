"""backend: the environment is read on every call (at a dict lookup's cost on POSIX), and
gives what os.environ gives."""
import os

import pytest
import torch

from gradstats import backend
from gradstats.backend import Backend


@pytest.mark.parametrize("value", [None, "", "0", "1", " Torch ", "é-ünïcode"])
def test_environment_reads_agree_with_os_environ(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("GRADSTATS_TEST_VARIABLE", raising=False)
    else:
        monkeypatch.setenv("GRADSTATS_TEST_VARIABLE", value)
    assert (backend._environ_get("GRADSTATS_TEST_VARIABLE", "unset")
            == os.environ.get("GRADSTATS_TEST_VARIABLE", "unset"))


def test_the_requested_backend_follows_every_change(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    assert backend.choose_backend(cpu) is Backend.TORCH
    monkeypatch.setenv(backend.BACKEND_ENV, " TORCH ")
    assert backend.requested_backend() == "torch"
    monkeypatch.delenv(backend.BACKEND_ENV)
    assert backend.requested_backend() == "auto"
    monkeypatch.setenv(backend.BACKEND_ENV, "cuda")
    for _ in range(2):  # a bad value is refused every time, not only when first parsed
        with pytest.raises(ValueError, match="GRADSTATS_BACKEND must be .* got 'cuda'"):
            backend.requested_backend()


def test_interpreter_flag_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpreter_enabled()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backend.interpreter_enabled()


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "meta"])
def test_device_type_is_the_devices(name):
    device = torch.device(name)
    assert backend.device_type(device) == device.type
    assert backend.device_type(torch.device(name)) == device.type  # remembered


def test_a_replaced_os_environ_is_read(monkeypatch):
    """os.environ replaced by another mapping (mock.patch.object(os, "environ", {...}),
    monkeypatch.setattr): the backend follows it, as os.environ.get does."""
    monkeypatch.setattr(os, "environ", {backend.BACKEND_ENV: "torch", "TRITON_INTERPRET": "1"})
    assert backend.requested_backend() == "torch"
    assert backend.interpreter_enabled()
    assert backend.choose_backend(torch.device("cpu")) is Backend.TORCH
