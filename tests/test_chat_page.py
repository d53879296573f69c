"""The chat page at / in a real headless Chromium (Debian's chromium + chromedriver, Selenium),
against a real server on 127.0.0.1: the streamed answer it shows is the one the openai client gets.

Selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium and runs offline
(``SE_OFFLINE``), so Selenium Manager downloads nothing. ``LMREF_CHAT_SCREENSHOT=docs/chat_page.png``
makes the real-model test save its screenshot there (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import openai
import pytest
import requests

from lmref.core.manifest import write_manifest
from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig

KEY = "page-key-1"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REAL_MODEL = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.integration,  # Chromium and a server
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (make system)",
    ),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def second_model_dir(tiny_tokenizer, tmp_path_factory):
    """Another random tiny Llama, so the model chosen in the page makes a difference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-b")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    write_manifest(path)
    return path


def chat_in_page(
    driver,
    url: str,
    model: str,
    question: str,
    max_tokens: int,
    key: str | None = None,
    timeout: float = 120,
) -> dict:
    """Open the page, give the key if it asks, pick the model, send, wait for the answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout)
    if key is not None:
        box = wait.until(ready.visibility_of_element_located((By.ID, "api-key")))
        box.send_keys(key)
        driver.find_element(By.ID, "max-tokens").click()  # leaving the field fires "change"
    wait.until(
        lambda d: (
            model
            in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")]
        )
    )
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    for field, value in (("max-tokens", max_tokens), ("temperature", 0)):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(str(value))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
    read = "return document.querySelector(arguments[0]).textContent"
    return {
        "status": driver.find_element(By.ID, "status").text,
        "answer": driver.execute_script(read, "#messages .assistant:last-of-type .content"),
        "errors": [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error")],
        "key_asked": driver.find_element(By.ID, "key-box").is_displayed(),
        **{
            name: driver.find_element(By.ID, name).text
            for name in ("ttft", "tps", "tokens", "answered-by")
        },
    }


def test_page_streams_the_answer_the_api_gives(browser, tiny_model_dir, second_model_dir):
    server = start_server(
        ServingConfig(
            models=[
                ModelSpec("tiny-a", str(tiny_model_dir)),
                ModelSpec("tiny-b", str(second_model_dir)),
            ],
            api_keys=[KEY],
            cache_size=0,
            torch_threads=1,
        )
    )
    try:
        assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
        page = requests.get(server.url + "/", timeout=10)  # the page itself needs no key
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        shown = chat_in_page(browser, server.url, "tiny-b", "Sort the list", 24, key=KEY)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": "Sort the list"}]
        reply = client.chat.completions.create(
            model="tiny-b", messages=messages, max_tokens=24, temperature=0
        )
        other = client.chat.completions.create(
            model="tiny-a", messages=messages, max_tokens=24, temperature=0
        )
    finally:
        server.stop(drain_timeout=5)
    assert shown["status"] == "done" and not shown["errors"] and shown["key_asked"], shown
    assert shown["answer"] == reply.choices[0].message.content
    assert reply.choices[0].message.content != other.choices[0].message.content  # it mattered
    assert shown["answered-by"] == "tiny-b"
    assert shown["tokens"] == str(reply.usage.completion_tokens)
    assert re.fullmatch(r"\d+ ms", shown["ttft"]), shown
    assert re.fullmatch(r"\d+\.\d tokens/s", shown["tps"]), shown


@pytest.mark.skipif(
    not (REAL_MODEL / "config.json").exists(), reason="artifacts/smollm2-135m-instruct not built"
)
def test_page_with_the_real_chat_model(browser, tmp_path):
    question = "What is the capital of France? Answer in one sentence."
    server = start_server(
        ServingConfig(
            models=[ModelSpec("smollm2", str(REAL_MODEL))],
            api_keys=[],
            cache_size=0,
            torch_threads=1,
        )
    )
    try:
        # The API first: the page's TTFT then shows a warm server, not the first forward pass.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            max_tokens=48,
            temperature=0,
        )
        shown = chat_in_page(browser, server.url, "smollm2", question, 48)
        shot = tmp_path / "chat_page.png"
        browser.save_screenshot(str(shot))
    finally:
        server.stop(drain_timeout=5)
    assert shown["status"] == "done" and "Paris" in shown["answer"], shown
    assert not shown["key_asked"]  # auth off: no key field
    assert shown["answer"] == reply.choices[0].message.content
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LMREF_CHAT_SCREENSHOT"):
        shutil.copy(shot, os.environ["LMREF_CHAT_SCREENSHOT"])
