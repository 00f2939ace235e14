//! Built-in source models: one decoder for the Llama family (`decoder.rs`)
//! and its three flavours.

pub mod decoder;
