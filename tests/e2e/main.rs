//! End-to-end suite: real RabbitMQ, real Redis, real `coordinator` and `worker` processes.
//!
//! Each test gets its own namespace (exchanges and queues prefixed `t<uuid>`, Redis keys `{t<uuid>}`),
//! so tests run in parallel against shared servers. Service URLs come from
//! `FLEETBATCH_TEST_AMQP_URL` and `FLEETBATCH_TEST_REDIS_URL` (default: loopback).

#![allow(unreachable_pub, missing_debug_implementations)]

mod access;
mod bench;
mod browser;
mod cancel;
mod cli;
mod dashboard;
mod dead_letter;
mod deploy;
mod devices;
mod dry_run;
mod faults;
mod forged;
mod guarantees;
mod helpers;
mod hostile;
mod invalid_input;
mod job_roundtrip;
mod memory;
mod observability;
mod openapi;
mod queries;
mod redis_cluster;
mod rerun;
mod rollouts;
mod safe_create;
mod scale;
mod schedule;
mod secure;
mod services;
mod templates;
mod waiting;
