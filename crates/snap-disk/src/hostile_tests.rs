//! Files whose checksums are right but whose metadata lies: opening must refuse them.
