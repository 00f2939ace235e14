//! Score a batch with the decoder and write the logits as raw f32 (used by
//! scripts/compare_transformers.py). Prints the time of the second forward
//! (after one warm-up) in seconds.
//!
//!     cargo run --release --example score -- MODEL_DIR B L IDS.bin MASK.bin OUT.bin

use candle_core::{Device, Tensor};
use fusechat::core::model::LoadOptions;
use fusechat::plugins::models::decoder::Decoder;

fn read_u32(path: &str) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn main() {
    fusechat::tune_allocator_for_compute();
    let a: Vec<String> = std::env::args().collect();
    let (b, l): (usize, usize) = (a[2].parse().unwrap(), a[3].parse().unwrap());
    let m = Decoder::load(a[1].as_ref(), &LoadOptions::default(), None).unwrap();
    let ids = Tensor::from_vec(read_u32(&a[4]), (b, l), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(read_u32(&a[5]), (b, l), &Device::Cpu).unwrap();
    let _warm_up = m.forward(&ids, &mask).unwrap();
    drop(_warm_up);
    let t0 = std::time::Instant::now();
    let logits = m.forward(&ids, &mask).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a[6], bytes).unwrap();
    println!("{secs}");
}
