"""Serving (tools/serve.py): the real server in a subprocess on a tiny random checkpoint, talked to by the official
``openai`` client (chat and completions, streaming and not, 8 concurrent streams = the same requests one by one),
bad input answered with OpenAI-style 4xx errors while the server lives on, a client that leaves mid-stream freeing
its slot, bearer auth, and the chat page in a real headless Chromium (selenium)."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra's openai client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="serving needs the serve extra (fastapi, uvicorn)")
portpicker = pytest.importorskip("portpicker")

from internevo_jax import config as config_lib  # noqa: E402
from internevo_jax.checkpoint.manager import Checkpointer  # noqa: E402
from internevo_jax.convert.hf_layout import save_hf  # noqa: E402
from internevo_jax.serving.chat import render_internlm2  # noqa: E402
from internevo_jax.serving.text import ByteTokenizer, TextStream  # noqa: E402

from . import test_tokenized  # noqa: E402
from .conftest import ROOT, random_tiny_model  # noqa: E402

sp_model = test_tokenized.sp_model  # a 100-piece SentencePiece model; ids 1 and 2 are BOS and EOS
API_KEY = "test-key"
MAX_LENGTH = 128
SLOTS = 4  # fewer slots than the 8 concurrent clients: requests also wait for a slot and join mid-decode


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = API_KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, key: str = API_KEY, **kw) -> httpx.Response:
        content = body if isinstance(body, str | bytes) else json.dumps(body)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=120, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


def start_server(folder, tokenizer, log_path, *extra) -> Server:
    port = portpicker.pick_unused_port()
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "serve.py"),
        f"--config.generation.ckpt_folder=local:{folder}",
        f"--config.generation.max_length={MAX_LENGTH}",
        f"--port={port}",
        *(["--config.generation.tokenizer_path=" + str(tokenizer)] if tokenizer else []),
        *extra,
    ]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    log = open(log_path, "w")  # closed by stop_server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{open(log_path).read()}")
        try:
            if server.health()["status"] == "ok":
                return server
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not come up in 180 s:\n{open(log_path).read()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    server.log.close()


@pytest.fixture(scope="module", autouse=True)
def no_proxy_for_the_local_server():
    """httpx (and so the openai client) would send 127.0.0.1 through an HTTP(S)_PROXY of the environment."""
    saved = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    for key, value in saved.items():
        os.environ[key] = ",".join(filter(None, ["127.0.0.1,localhost", value]))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_module):
    """A tiny InternLM2 with random weights (logits scaled up, so greedy choices are no near ties), saved as one of
    our checkpoints with its config, as training writes them. EOS ids: none, so replies run to their length."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config_module("generation.eos_id=[]")
    model, params = random_tiny_model(cfg)
    params["output"] = 5 * params["output"]
    ckpt = config_lib.default_config().ckpt
    ckpt.update(dict(save_ckpt_folder=str(tmp / "tiny-chat"), checkpoint_every=1))
    writer = Checkpointer(ckpt)
    writer.save(1, {"params": params}, dict(config=config_lib.to_json(cfg)))
    writer.close()
    save_hf(params, cfg.model, tmp / "tiny-hf")  # the same weights as a Hugging Face folder
    return tmp / "tiny-chat"


@pytest.fixture(scope="module")
def tiny_config_module():
    def make(*overrides: str):
        return config_lib.load(ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in overrides])

    return make


@pytest.fixture(scope="module")
def server(checkpoint, sp_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    server = start_server(checkpoint, sp_model[0], log, f"--api-key={API_KEY}", f"--max-batch-size={SLOTS}")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The CPU demo (configs/demo.py, no tokenizer: the server reads text as UTF-8 bytes) trained for 2 steps by
    launch.py, its checkpoint served with the checkpoint's own config. EOS ids off, so replies have their length."""
    tmp = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the demo runs for a user
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            f"--config={ROOT / 'configs' / 'demo.py'}",
            "--config.data.total_steps=2",
            "--config.ckpt.checkpoint_every=2",
            f"--config.ckpt.save_ckpt_folder=local:{tmp / 'demo'}",
            f"--config.run_folder={tmp / 'run'}",
            "--launcher=local",
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    server = start_server(tmp / "demo", None, tmp / "server.log", "--config.generation.eos_id=[]")
    yield server
    stop_server(server)


# ---------------------------------------------------------------------------------------------------------------------
# The openai client

PROMPTS = ["kalo mine su", "ra", "to vize puda fe go hi", "ju qu", "wy xo by ce ka lo", "mi", "ne su ra to", "ze"]


def chat_stream(client, text: str, max_tokens: int, model: str = "tiny-chat") -> tuple[str, str, dict]:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


def test_models_chat_and_completions_with_the_openai_client(server, sp_model):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]

    sp = sp_model[2]
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "kalo mine"}], max_tokens=12, temperature=0
    )
    prompt_ids = [sp.bos_id(), *sp.encode(render_internlm2([("user", "kalo mine")]))]
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + reply.usage.completion_tokens
    text, finish, usage = chat_stream(client, "kalo mine", 12)
    assert text == reply.choices[0].message.content  # streamed = not streamed, greedy
    assert finish == reply.choices[0].finish_reason and usage.completion_tokens == reply.usage.completion_tokens

    done = client.completions.create(model="tiny-chat", prompt="kalo mine", max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10
    pieces = client.completions.create(model="tiny-chat", prompt="kalo mine", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    by_ids = client.completions.create(
        model="tiny-chat", prompt=[sp.bos_id(), *sp.encode("kalo mine")], max_tokens=10, temperature=0
    )
    assert by_ids.choices[0].text == done.choices[0].text  # a prompt of token ids = the same text

    # Sampling: the same seed draws the same reply; stop strings cut it (not included).
    sampled = [
        client.completions.create(
            model="tiny-chat", prompt="ra", max_tokens=20, temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    full = done.choices[0].text
    stop = full.strip()[2:4]
    assert stop and stop in full
    cut = client.completions.create(model="tiny-chat", prompt="kalo mine", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.find(stop)]


def test_concurrent_streams_equal_the_same_requests_alone(server):
    client = server.client()
    alone = [chat_stream(client, p, 8 + 3 * i) for i, p in enumerate(PROMPTS)]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda a: chat_stream(client, *a), [(p, 8 + 3 * i) for i, p in enumerate(PROMPTS)]))
    assert [t[:2] for t in together] == [a[:2] for a in alone]
    assert all(a[0] for a in alone) and len({a[0] for a in alone}) > 1  # real, different replies
    assert server.health()["active"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, auth, disconnects

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "kalo"}]


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (CHAT, {"model": "gpt-4", "messages": HELLO}, 404, "the model 'gpt-4' does not exist: this server serves"),
        (CHAT, '{"messages": [', 400, "the request body is not valid JSON"),
        (CHAT, {"messages": HELLO, "max_tokens": 1000}, 400, "exceed the model's context of 128 tokens"),
        (CHAT, {"messages": []}, 400, "'messages': List should have at least 1 item"),
        (CHAT, {"messages": HELLO, "max_tokens": "10"}, 400, "'max_tokens': Input should be a valid integer"),
        (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "'temperature': Input should be a valid number"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "'messages.0.role': Input should be"),
        (CHAT, {"messages": HELLO, "n": 2}, 400, "'n': Input should be 1"),
        (CHAT, [1, 2], 400, "the request body must be a JSON object, got list"),
        ("/v1/completions", {"prompt": [5, 9999]}, 400, "token ids outside the vocabulary [0, 256): [9999]"),
        ("/v1/completions", {"prompt": "x" * 300}, 400, "exceed the model's context of 128 tokens"),
        ("/v1/nothing", {}, 404, "POST /v1/nothing: Not Found"),
    ],
)
def test_bad_input_gets_an_openai_error(server, path, body, status, message):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert server.health()["status"] == "ok"


def test_auth_and_the_openai_client_sees_errors(server):
    assert server.post(CHAT, {"messages": HELLO}, key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens to at most"):
        server.client().chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=999)
    assert httpx.get(server.url + "/health").status_code == 200  # open without the key


@pytest.fixture
def slow_server(tiny_config_module):
    """The app in this process (uvicorn in a thread) on a random tiny model with bytes for text, its decode step
    slowed to ``delay`` (20 ms: a reply is still running when its client leaves) and made to fail when ``fail`` is
    set."""
    import threading

    import uvicorn

    from internevo_jax.serving.app import create_app
    from internevo_jax.serving.engine import Engine

    cfg = tiny_config_module()
    engine = Engine(random_tiny_model(cfg)[0], MAX_LENGTH, 2)
    fast_step, state = engine._step, {"fail": False, "delay": 0.02}

    def slow_step(*args):
        time.sleep(state["delay"])
        out = fast_step(*args)  # the cache buffers are donated to it: after a failure here they are gone
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("injected failure")
        return out

    engine._step = slow_step
    engine.start()
    port = portpicker.pick_unused_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ByteTokenizer(), "bytes"), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield Server(None, port, None), engine, state
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def test_a_client_leaving_mid_stream_frees_its_slot_and_failures_stay_with_their_request(slow_server):
    server, engine, state = slow_server
    body = {"messages": HELLO, "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        content = (line for line in r.iter_lines() if '"content"' in line and '"role"' not in line)
        next(content)  # a token arrived: the request is decoding
        assert server.health()["active"] == 1
        (request,) = [row for row in engine.rows if row is not None]
    # The connection is closed: the request is cancelled and leaves its slot at the next step, long before its 60
    # tokens (20 ms a step).
    deadline = time.time() + 10
    while server.health()["active"] and time.time() < deadline:
        time.sleep(0.02)
    assert server.health()["active"] == 0 and request.cancelled and request.generated < 30

    # The same without streaming: the client gives up waiting, the server notices and cancels.
    steps = engine.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=body | {"stream": False}, timeout=0.5)
    deadline = time.time() + 10
    while server.health()["active"] and time.time() < deadline:
        time.sleep(0.02)
    assert server.health()["active"] == 0 and engine.steps - steps < 50

    state["fail"] = True  # a decode step that raises fails its requests (500, the reason named), not the server
    r = server.post(CHAT, {"messages": HELLO, "max_tokens": 5})
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"], r.text
    r = server.post(CHAT, {"messages": HELLO, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    tok = ByteTokenizer()
    stream = TextStream(tok, stops=["<|im_end|>"], skip_ids=[300])
    sent = [stream.push(t)[0] for t in "hé<|im".encode()]
    assert "".join(sent) == "hé" and sent[1] == ""  # é's first byte alone is held back
    assert stream.push(300) == ("", False)  # a skipped id (EOS) is no text
    assert stream.push(ord("x")) == ("<|imx", False)  # not a stop after all: sent
    assert [stream.push(t) for t in b"<|im_end|>"][-1] == ("", True)
    assert stream.text == "hé<|imx" and stream.flush() == ""
    invalid = TextStream(tok)  # bytes that never form a character are sent once they cannot complete one
    assert [invalid.push(0xFF)[0] for _ in range(5)] == ["", "", "", "\ufffd" * 4, "\ufffd"]


def test_chat_prompt_uses_the_tokenizers_template_else_internlm2(sp_model, tmp_path):
    pytest.importorskip("transformers", reason="a tokenizer folder needs transformers (parity extra)")
    from internevo_jax.convert.hf_tokenizer import SentencePieceTokenizer
    from internevo_jax.serving.chat import IM_END, chat_prompt
    from tools.generate import TextTokenizer

    sp = sp_model[2]
    messages = [("system", "be brief"), ("user", "kalo mine")]
    ids, stop_ids, stops = chat_prompt(TextTokenizer(str(sp_model[0])), messages)  # SentencePiece: no template
    assert ids == [sp.bos_id(), *sp.encode(render_internlm2(messages))] and stop_ids == [] and stops == [IM_END]
    assert render_internlm2(messages) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nkalo mine<|im_end|>\n<|im_start|>assistant\n"
    )

    folder = tmp_path / "tok"
    folder.mkdir()
    SentencePieceTokenizer(sp_model[0]).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}assistant"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = TextTokenizer(str(folder))
    ids, stop_ids, stops = chat_prompt(tokenizer, messages)  # the folder's own template and EOS
    assert tokenizer.hf.decode(ids) == "system be brief user kalo mine assistant"
    assert stop_ids == [sp.eos_id()] and stops == []


def test_an_hf_folder_with_its_own_tokenizer_and_chat_template(server, checkpoint, sp_model, tmp_path):
    """tools/serve.py on the same weights as an HF folder holding its tokenizer (with a chat template): no
    tokenizer flag needed, the same greedy completion as from our checkpoint, chat prompts from the template."""
    pytest.importorskip("transformers", reason="a tokenizer folder needs transformers (parity extra)")
    from internevo_jax.convert.hf_tokenizer import SentencePieceTokenizer

    folder = checkpoint.parent / "tiny-hf"
    SentencePieceTokenizer(sp_model[0]).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}assistant"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = start_server(folder, None, tmp_path / "hf.log", "--config.generation.eos_id=[]")
    try:
        client = hf.client()
        assert [m.id for m in client.models.list().data] == ["tiny-hf"]
        want = server.client().completions.create(model="tiny-chat", prompt="kalo mine", max_tokens=10, temperature=0)
        got = client.completions.create(model="tiny-hf", prompt="kalo mine", max_tokens=10, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
        reply = client.chat.completions.create(model="tiny-hf", messages=HELLO, max_tokens=5, temperature=0)
        sp = sp_model[2]
        assert reply.usage.prompt_tokens == len(sp.encode("user kalo assistant"))  # the template, no BOS
    finally:
        stop_server(hf)


def test_internevo_routes(server):
    assert server.post("/internlm/models", {}).status_code == 405  # a GET route, as InternEvo's
    models = httpx.get(server.url + "/internlm/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert models["data"][0]["id"] == "tiny-chat"
    body = {"messages": [{"role": "user", "content": "kalo mine"}], "temperature": 0, "top_p": 0.8, "max_length": 60}
    r = server.post("/internlm/chat/completions", body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == 60 and r.json()["choices"][0]["finish_reason"] == "length"  # prompt + reply
    r = server.post("/internlm/chat/completions", body | {"max_length": 10})
    assert r.status_code == 400 and "max_length=10 (prompt + reply) leaves no room" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real browser


def browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing (CI installs both)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--window-size=1100,700",
    ):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_demo_checkpoint_answers_the_openai_client(demo_server):
    client = demo_server.client(key="unused")  # this server wants no key
    assert [m.id for m in client.models.list().data] == ["demo"]
    reply = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=10, temperature=0)
    prompt = render_internlm2([("user", "kalo")]).encode()  # bytes are the ids
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 10
    text, finish, usage = chat_stream(client, "kalo", 10, model="demo")
    assert (text, finish) == (reply.choices[0].message.content, "length") and usage.completion_tokens == 10
    done = client.completions.create(model="demo", prompt="12 13 14", max_tokens=5, temperature=0.7, seed=1)
    assert done.usage.prompt_tokens == 8 and done.usage.completion_tokens == 5


def test_the_chat_page_in_a_headless_browser(demo_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = demo_server
    want, _, _ = chat_stream(server.client(), "kalo mine", 24, model="demo")
    driver = browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "demo"))
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("24")
        driver.find_element(By.ID, "input").send_keys("kalo mine\n")
        done = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".assistant.done")))
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "kalo mine"
        meta = done.find_element(By.CSS_SELECTOR, ".meta").text
        assert "length" in meta and "24 tokens" in meta, meta
        streamed = driver.execute_script("return arguments[0].firstChild.textContent", done)
        assert streamed == want  # what the page assembled from the stream = the openai client's greedy reply
        assert not driver.find_element(By.ID, "error").is_displayed()

        # A refused request shows the server's message.
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("5000")
        driver.find_element(By.ID, "input").send_keys("ra\n")
        wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "400: the prompt's" in driver.find_element(By.ID, "error").text
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        if os.environ.get("CI_ARTIFACTS"):
            os.makedirs(os.environ["CI_ARTIFACTS"], exist_ok=True)
            shutil.copy(shot, os.environ["CI_ARTIFACTS"])
    finally:
        driver.quit()


def test_the_page_stop_button_ends_the_stream_and_frees_the_slot(slow_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, engine, state = slow_server
    state["delay"] = 0.05  # 60 tokens would take 3 s
    driver = browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "bytes"))
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("60")
        driver.find_element(By.ID, "input").send_keys("hello\n")
        # Text has arrived (maybe only control characters, which .text does not show).
        started = "const r = document.querySelector('.assistant'); return r !== null && r.textContent.length > 0"
        WebDriverWait(driver, 60, poll_frequency=0.02).until(lambda d: d.execute_script(started))
        stop = driver.find_element(By.ID, "stop")
        assert stop.is_enabled() and not driver.find_element(By.ID, "send").is_enabled()
        stop.click()
        done = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".assistant.done")))
        assert done.find_element(By.CSS_SELECTOR, ".meta").text == "stopped"
        assert driver.find_element(By.ID, "send").is_enabled() and not stop.is_enabled()
        deadline = time.time() + 10
        while server.health()["active"] and time.time() < deadline:
            time.sleep(0.02)
        assert server.health()["active"] == 0 and engine.steps < 50  # the aborted fetch freed the slot early
    finally:
        driver.quit()
