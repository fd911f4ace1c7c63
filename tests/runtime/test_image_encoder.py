"""The picture encoder's worker: the newest picture only, a repeated one skipped, a failure said."""

from __future__ import annotations

import time

import numpy as np
import torch

from bridge.io import Frame, now
from bridge.runtime.image_encoder import ImageEncoderWorker


def frame(value: int) -> Frame:
    return Frame(np.full((4, 4, 3), value, np.uint8), "rgb", now(), 0)


def wait_for(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def test_a_picture_equal_to_the_last_encoded_is_not_encoded_again():
    worker = ImageEncoderWorker(
        lambda pixels: torch.tensor(float(pixels[0, 0, 0])), torch.device("cpu"), "test", print
    )
    worker.start()
    try:
        worker.request(frame(7))
        wait_for(lambda: worker.encoded == 1)
        assert worker.take().tokens.item() == 7.0
        worker.request(frame(7))  # the same picture in a new frame
        wait_for(lambda: worker.skipped == 1)
        worker.request(frame(9))
        wait_for(lambda: worker.encoded == 2)
        assert worker.take().tokens.item() == 9.0
        assert worker.take() is None  # each result is handed over once
    finally:
        worker.stop()
        worker.join(5)


def test_a_picture_that_fails_is_said_and_the_worker_goes_on():
    said: list[str] = []

    def encode(pixels: np.ndarray) -> torch.Tensor:
        if pixels[0, 0, 0] == 1:
            raise RuntimeError("out of memory")
        return torch.tensor(float(pixels[0, 0, 0]))

    worker = ImageEncoderWorker(encode, torch.device("cpu"), "IP-Adapter image", said.append)
    worker.start()
    try:
        worker.request(frame(1))
        wait_for(lambda: worker.failures == 1)
        worker.request(frame(2))
        wait_for(lambda: worker.encoded == 1)
        assert worker.take().tokens.item() == 2.0
    finally:
        worker.stop()
        worker.join(5)
    assert said == [
        "the IP-Adapter image could not be encoded (out of memory); keeping the last one."
    ]
