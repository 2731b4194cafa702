"""A headless Chromium for the Rust tests (tests/support/browser.rs), driven by Selenium.

Debian's chromium and chromium-driver (never a downloaded browser: the driver's path is given,
so Selenium Manager is not asked). The Rust side sends one JSON command per line on stdin and
reads one JSON answer per line on stdout: {"ok": value} or {"error": "..."}.

  {"get": url}                         load a page
  {"run": script, "args": [...]}       execute_async_script: the script calls its last argument
  {"screenshot": path}                 save a PNG of the page
  {"quit": true}                       close the browser and exit

The first line written is {"ok": "ready"} once the browser runs, or {"error": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback


def answer(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--chromedriver", required=True)
    parser.add_argument("--user-data-dir", required=True)
    parser.add_argument("--script-timeout-secs", type=float, default=20)
    args = parser.parse_args()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = args.chromium
        for flag in [
            "--headless",
            "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={args.user_data_dir}",
            "--window-size=1000,800",
        ]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=options)
        driver.set_script_timeout(args.script_timeout_secs)
    except Exception as e:  # the Rust side prints it with an install hint
        answer(error=f"cannot start Chromium through chromedriver: {e!r}\n{traceback.format_exc()}")
        return 1
    answer(ok="ready")
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                if "get" in command:
                    driver.get(command["get"])
                    answer(ok=None)
                elif "run" in command:
                    answer(ok=driver.execute_async_script(command["run"], *command.get("args", [])))
                elif "screenshot" in command:
                    answer(ok=driver.save_screenshot(command["screenshot"]))
                elif "quit" in command:
                    answer(ok=None)
                    break
                else:
                    answer(error=f"unknown command {command!r}")
            except Exception as e:
                answer(error=repr(e))
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
