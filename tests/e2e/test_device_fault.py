"""A device fault in the middle of serving (injected with TL_INJECT_FAULT,
which makes the model's step fail as a GPU fault would, on any device):
a failed step fails its requests with a clear error and the server goes
on; a lost device fails every request with 503 and stops the server with
a message and a non-zero exit, so a supervisor or router replaces it. Never
a hang."""
import openai
import pytest

from conftest import QWEN_ID, Server


def chat(url, max_tokens=16):
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return c.chat.completions.create(
        model=QWEN_ID,
        messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=max_tokens,
        temperature=0,
    )


def test_a_failed_step_fails_its_request_and_the_server_goes_on():
    s = Server("--max-batch", "4", env={"TL_INJECT_FAULT": "2"})
    try:
        with pytest.raises(openai.APIStatusError) as e:
            chat(s.url)
        assert e.value.status_code == 500
        assert "injected fault" in str(e.value), str(e.value)
        # The device works: the next requests complete.
        for _ in range(2):
            r = chat(s.url, max_tokens=8)
            assert r.choices[0].finish_reason == "length"
        assert s.proc.poll() is None
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_a_lost_device_fails_requests_and_stops_the_server():
    s = Server("--max-batch", "4", env={"TL_INJECT_FAULT": "2:fatal"})
    try:
        with pytest.raises(openai.APIStatusError) as e:
            chat(s.url)
        assert e.value.status_code == 503
        assert "device" in str(e.value), str(e.value)
        # The server stops by itself, with the reason, within seconds.
        rc = s.proc.wait(30)
    finally:
        s.stop()
    log = open(s.log_path).read()
    assert rc != 0, log
    assert "the device failed" in log, log
