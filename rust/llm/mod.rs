//! The LLM stages' column work (`[lengthen.NAME]`, `[[generate]]`): the calls themselves
//! are made from Python; the core fills prompts, keys the call cache and parses replies,
//! whole columns at a time.

pub mod prompts;
pub mod replies;
