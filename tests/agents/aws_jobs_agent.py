"""A device agent written only against the AWS IoT Device SDK v2 for Python jobs client
(pip package awsiotsdk), as a device moving from AWS IoT Jobs would run it.

    python aws_jobs_agent.py --host 127.0.0.1 --port 1883 --thing T --mode succeed

Modes:
  succeed           start-next, then update SUCCEEDED
  fail              start-next, then update FAILED
  version-mismatch  start-next, update with a stale expectedVersion (must be rejected with
                    VersionMismatch), then update SUCCEEDED with the right version
  step-timeout      start-next with stepTimeoutInMinutes=1, wait past the timer, then update
                    SUCCEEDED (must be rejected with InvalidStateTransition: it TIMED_OUT)
  after-cancel      connects after its only job was canceled: get-pending must list
                    nothing, describe $next and start-next must hand it nothing
  long-step         start-next with stepTimeoutInMinutes=5, work 25 s (far longer than the
                    job's attempt timeout), then update SUCCEEDED (must be accepted)
  missed-notify     loses the first notify-next that names a job (as a device whose broker
                    dropped it), then as succeed once notified again

Prints one JSON line per event; the last line is {"done": true, ...} and the exit code is 0
when the agent saw what its mode expects.
"""

import argparse
import json
import sys
import threading
import time

from awscrt import mqtt
from awsiot import iotjobs

QOS = mqtt.QoS.AT_LEAST_ONCE


def say(**event):
    print(json.dumps(event), flush=True)


def asked_first(jobs, thing):
    """get-pending, then describe $next, as an agent may ask before it starts anything;
    True when neither names a job."""
    answers = {}
    got = threading.Event()

    def on(kind):
        def keep(resp):
            answers[kind] = resp
            if len(answers) == 2:
                got.set()
        return keep

    def on_rejected(err):
        say(event="request-rejected", code=err.code, message=err.message)

    subs = [
        jobs.subscribe_to_get_pending_job_executions_accepted(
            iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), QOS,
            on("pending")),
        jobs.subscribe_to_get_pending_job_executions_rejected(
            iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), QOS,
            on_rejected),
        jobs.subscribe_to_describe_job_execution_accepted(
            iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="$next"),
            QOS, on("next")),
        jobs.subscribe_to_describe_job_execution_rejected(
            iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="$next"),
            QOS, on_rejected),
    ]
    for future, _topic in subs:
        future.result(10)
    jobs.publish_get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(thing_name=thing, client_token="pending"), QOS)
    jobs.publish_describe_job_execution(
        iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id="$next",
                                            client_token="next"), QOS)
    if not got.wait(30):
        say(event="no-answer", got=sorted(answers))
        return False
    pending, nxt = answers["pending"], answers["next"]
    named = [j.job_id for j in (pending.queued_jobs or []) + (pending.in_progress_jobs or [])]
    say(event="asked", pending=named,
        next=nxt.execution.job_id if nxt.execution else None)
    return not named and nxt.execution is None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--thing", required=True)
    p.add_argument("--mode", required=True,
                   choices=["succeed", "fail", "version-mismatch", "step-timeout",
                            "after-cancel", "long-step", "missed-notify"])
    p.add_argument("--timeout", type=float, default=240)
    args = p.parse_args()
    thing = args.thing

    client = mqtt.Client(None, None)
    conn = mqtt.Connection(client=client, host_name=args.host, port=args.port,
                           client_id=thing, clean_session=True, keep_alive_secs=30)
    conn.connect().result(10)
    jobs = iotjobs.IotJobsClient(conn)

    done = threading.Event()
    outcome = {"ok": False}
    started = set()
    lock = threading.Lock()

    def finish(ok, **extra):
        outcome["ok"] = ok
        say(done=True, ok=ok, **extra)
        done.set()

    def start_next():
        step = {"step-timeout": 1, "long-step": 5}.get(args.mode)
        jobs.publish_start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(
                thing_name=thing, client_token="start-" + thing,
                status_details={"agent": "awsiotsdk"}, step_timeout_in_minutes=step),
            QOS)

    def update(job_id, status, version, token, details=None):
        jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(
                thing_name=thing, job_id=job_id, status=status, expected_version=version,
                status_details=details or {}, client_token=token,
                include_job_execution_state=True),
            QOS)

    missed = []

    def on_next(event):
        if event.execution is None:
            say(event="notify-next", execution=None)
            return
        if args.mode == "missed-notify" and not missed:
            missed.append(event.execution.job_id)
            say(event="notify-next-missed", job_id=event.execution.job_id)
            return
        say(event="notify-next", job_id=event.execution.job_id,
            status=event.execution.status)
        start_next()

    def on_start_accepted(resp):
        e = resp.execution
        if e is None:
            say(event="start-next-accepted", execution=None)
            if args.mode == "after-cancel":
                finish(True)
            return
        if args.mode == "after-cancel":
            say(event="start-next-accepted", job_id=e.job_id, status=e.status)
            finish(False, error="handed the job of a canceled job: " + e.job_id)
            return
        with lock:
            if e.job_id in started:
                return
            started.add(e.job_id)
        say(event="start-next-accepted", job_id=e.job_id, status=e.status,
            version=e.version_number, execution_number=e.execution_number,
            document=e.job_document, client_token=resp.client_token)
        if e.status != "IN_PROGRESS":
            finish(False, error="start-next did not put the execution IN_PROGRESS")
            return
        if args.mode in ("succeed", "missed-notify"):
            update(e.job_id, "SUCCEEDED", e.version_number, "final",
                   {"firmware": "2.0.0"})
        elif args.mode == "fail":
            update(e.job_id, "FAILED", e.version_number, "final", {"reason": "disk full"})
        elif args.mode == "version-mismatch":
            update(e.job_id, "IN_PROGRESS", e.version_number + 5, "stale")
        elif args.mode == "long-step":
            def slow():
                time.sleep(25)
                update(e.job_id, "SUCCEEDED", e.version_number, "final", {"worked": "25s"})
            threading.Thread(target=slow, daemon=True).start()
        elif args.mode == "step-timeout":
            def late():
                time.sleep(68)
                update(e.job_id, "SUCCEEDED", None, "late")
            threading.Thread(target=late, daemon=True).start()

    def on_update_accepted(resp):
        state = resp.execution_state
        say(event="update-accepted", client_token=resp.client_token,
            at_ms=int(time.time() * 1000),
            status=state.status if state else None,
            version=state.version_number if state else None)
        if resp.client_token == "final":
            finish(True)
        elif resp.client_token == "stale":
            finish(False, error="an update with a stale expectedVersion was accepted")
        elif resp.client_token == "late":
            finish(False, error="an update after the step timer ran out was accepted")

    def on_update_rejected(err):
        state = err.execution_state
        say(event="update-rejected", code=err.code, message=err.message,
            client_token=err.client_token,
            status=state.status if state else None,
            version=state.version_number if state else None)
        if err.client_token == "stale" and err.code == "VersionMismatch":
            # Retry with the version the device was told, as an agent would.
            job_id = current["job_id"]
            update(job_id, "SUCCEEDED", state.version_number, "final", {"retried": "yes"})
        elif err.client_token == "late":
            ok = err.code == "InvalidStateTransition" and state is not None \
                and state.status == "TIMED_OUT"
            finish(ok, code=err.code)
        else:
            finish(False, code=err.code)

    current = {}

    def remember(resp):
        if resp.execution is not None:
            current["job_id"] = resp.execution.job_id
        on_start_accepted(resp)

    def on_start_rejected(err):
        say(event="start-next-rejected", code=err.code, message=err.message)

    subs = [
        jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), QOS, on_next),
        jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), QOS,
            remember),
        jobs.subscribe_to_start_next_pending_job_execution_rejected(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), QOS,
            on_start_rejected),
        jobs.subscribe_to_update_job_execution_accepted(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), QOS,
            on_update_accepted),
        jobs.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), QOS,
            on_update_rejected),
    ]
    for future, _topic in subs:
        future.result(10)
    say(event="ready", thing=thing)
    if args.mode == "after-cancel" and not asked_first(jobs, thing):
        finish(False, error="get-pending or describe $next named the canceled job")
    # Pick up anything queued before this agent connected.
    start_next()
    if not done.wait(args.timeout):
        finish(False, error="timed out")
    conn.disconnect().result(10)
    sys.exit(0 if outcome["ok"] else 1)


if __name__ == "__main__":
    main()
