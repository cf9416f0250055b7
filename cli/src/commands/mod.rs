//! One module per command group.

pub(crate) mod access;
pub(crate) mod bench;
pub(crate) mod chaos;
pub(crate) mod demo;
pub(crate) mod devices;
pub(crate) mod dlq;
pub(crate) mod jobs;
pub(crate) mod queries;
pub(crate) mod schedules;
pub(crate) mod templates;
