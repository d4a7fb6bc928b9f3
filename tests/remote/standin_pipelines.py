"""Small pipelines the stand-in tests submit through the real SDK (compiled to IR per test).

No ``from __future__ import annotations`` here: kfp reads the component annotations as types.
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes


@dsl.component(base_image="python:3.11")
def write_secret(out: str, tag: str) -> None:
    """Writes which Secret-derived variable it saw (its length only), to prove injection."""
    import os
    import pathlib

    value = os.environ.get("STANDIN_SECRET", "")
    pathlib.Path(out).write_text(f"{tag}:{len(value)}:{os.environ.get('AWS_SECRET_ACCESS_KEY')}")


@dsl.component(base_image="python:3.11")
def sleep_then_fail(seconds: float, fail: bool) -> None:
    import time

    time.sleep(seconds)
    if fail:
        raise RuntimeError("asked to fail")


@dsl.component(base_image="python:3.11")
def say_why_and_fail(why: str) -> None:
    """Fails the way the train task does: the cause in the termination message, then raise."""
    from pipelines.termination import write_termination_message

    write_termination_message(why)
    raise RuntimeError(why)


@dsl.component(base_image="python:3.11")
def record_final(out: str, status: dsl.PipelineTaskFinalStatus) -> None:
    import pathlib

    pathlib.Path(out).write_text(status.state)


@dsl.pipeline(name="standin-secret")
def secret_pipeline(out: str, tag: str = "t"):
    task = write_secret(out=out, tag=tag)
    task.set_caching_options(False)
    kubernetes.use_secret_as_env(
        task, secret_name="standin-secret", secret_key_to_env={"token": "STANDIN_SECRET"}
    )


@dsl.pipeline(name="standin-exit")
def exit_pipeline(final_out: str, seconds: float = 0.0, fail: bool = False):
    final = record_final(out=final_out)
    final.set_caching_options(False)
    with dsl.ExitHandler(final):
        body = sleep_then_fail(seconds=seconds, fail=fail)
        body.set_caching_options(False)


@dsl.pipeline(name="standin-why")
def why_pipeline(why: str):
    body = say_why_and_fail(why=why)
    body.set_caching_options(False)


@dsl.pipeline(name="standin-job")
def job_pipeline(job_uuid: str, seconds: float = 0.0):
    """Shaped like the project's pipeline where it matters to listing: a job_uuid parameter."""
    body = sleep_then_fail(seconds=seconds, fail=False)
    body.set_caching_options(False)


def compile_to(pipeline, path: Path) -> Path:
    compiler.Compiler().compile(pipeline, str(path))
    return path
