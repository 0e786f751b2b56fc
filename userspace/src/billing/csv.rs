//! placeholder until the CSV export lands
