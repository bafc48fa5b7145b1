//! Storage behind volumes.

pub mod file;
mod sys;
