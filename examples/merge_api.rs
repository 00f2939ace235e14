//! Merging from the library: generate a tiny model set, plan a VaRM merge,
//! print the plan, execute it and print the weights VaRM chose.
//!
//!     cargo run --release --example merge_api

use fusechat::core::merge::engine::{execute, ExecOptions};
use fusechat::core::merge::plan::{plan, MergeRequest, ModelInput};
use fusechat::core::pipeline::miniature::{generate, MiniatureSpec};

fn main() -> fusechat::core::Result<()> {
    let dir = std::env::temp_dir().join("fusechat-example");
    let set = generate(&MiniatureSpec::default(), &dir.join("models"))?;

    let mut req = MergeRequest::new("varm", dir.join("merged"));
    req.base = Some(ModelInput::new(&set.pivot));
    req.models = set.targets.iter().map(ModelInput::new).collect();
    req.force = true;

    let registry = fusechat::registry();
    let p = plan(&req, &registry)?;
    let opts = ExecOptions::default();
    print!("{}", p.describe(opts.threads(), opts.memory_budget));

    let report = execute(&p, &opts)?;
    for (tensor, w) in report.weights.iter().take(5) {
        println!("{tensor}: {w:.3?}");
    }
    println!("wrote {}", report.out.display());
    Ok(())
}
